"""Several feature layers from one forward pass, CNN encoders, and encoders named by timm / Hugging Face id."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import plan
from pipeline.config import ConfigError, EncoderEntry, SubsetSpec
from pipeline.config_files import load_run_config, resolve_entry
from pipeline.models import _torchvision_shim, encoders
from pipeline.stages import encode
from storage import open_store
from storage.inspect import disk_bytes


def _jobs(make_job, specs, root: Path, n_images: int = 10):
    base = make_job(store_root=root, split="val", subset=SubsetSpec(max_images=n_images))
    return [replace(base, encoder=spec) for spec in specs]


@pytest.mark.parametrize(
    ("entry", "names"),
    [
        (EncoderEntry(encoder="tiny-vit-64", layers=[-1, -4, "last"]), ["L-1", "L-4", "last"]),
        (EncoderEntry(encoder="tiny-cnn-64", layers=[-1, -2, -3]), ["L-1", "", "L-3"]),  # -2: its own layer
    ],
)
def test_one_pass_writes_the_stores_of_separate_passes(make_job, tmp_path, entry, names):
    specs = resolve_entry(entry)
    assert [s.name for s in specs] == [f"{entry.encoder}.{n}".rstrip(".") for n in names]
    together = encode.run_layers(_jobs(make_job, specs, tmp_path / "one"), progress=False)
    apart = [encode.run(job, progress=False) for job in _jobs(make_job, specs, tmp_path / "apart")]
    for a, b in zip(together, apart, strict=True):
        assert a.store_path.name == b.store_path.name  # the same key: either way finds the other's store
        sa, sb = open_store(a.store_path), open_store(b.store_path)
        assert np.array_equal(sa.features(), sb.features())  # bit-identical on CPU
        assert np.array_equal(sa.pixels(), sb.pixels())
    # The pixels are compressed once per shard and linked into every layer's store; each store verifies alone.
    pixel_files = [r.store_path / "pixels" / "c" / "0" / "0" / "0" / "0" for r in together]
    assert len({f.stat().st_ino for f in pixel_files}) == 1
    assert all(not open_store(r.store_path).damaged_shards(full=True) for r in together)
    paths = [r.store_path for r in together]  # the disk they take together counts the linked shards once
    linked = disk_bytes(paths[0] / "pixels" / "c")
    assert disk_bytes(*paths) == sum(map(disk_bytes, paths)) - (len(paths) - 1) * linked
    grids = [open_store(r.store_path).features(0).shape for r in together]
    if entry.encoder.startswith("tiny-cnn"):  # a CNN's stages: the grid and width follow the stride
        assert grids == [(2, 2, 64), (4, 4, 48), (8, 8, 32)]
        assert [s.patch_size for s in specs] == [32, 16, 8]
    # Finished stores are found again, whichever way they were made.
    assert all(r.already_complete for r in encode.run_layers(_jobs(make_job, specs, tmp_path / "apart"),
                                                             progress=False))  # fmt: skip


def test_a_killed_multi_layer_pass_resumes_every_store(make_job, tmp_path, monkeypatch):
    specs = resolve_entry(EncoderEntry(encoder="tiny-vit-64", layers=[-1, -2]))
    jobs = _jobs(make_job, specs, tmp_path)
    calls = {"n": 0}
    real = encoders.Encoder.encode_layers

    def dies_on_second_shard(self, x, layers):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # as a kill between shards
        return real(self, x, layers)

    monkeypatch.setattr(encoders.Encoder, "encode_layers", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        encode.run_layers(jobs, progress=False)
    monkeypatch.setattr(encoders.Encoder, "encode_layers", real)
    stores = [open_store(p, require_complete=False) for p in tmp_path.glob("*.zarr")]
    assert len(stores) == 2 and all(s.shard_done().sum() == 1 and not s.complete for s in stores)
    resumed = encode.run_layers(jobs, progress=False)
    fresh = [encode.run(j, progress=False) for j in _jobs(make_job, specs, tmp_path / "fresh")]
    for a, b in zip(resumed, fresh, strict=True):
        assert np.array_equal(open_store(a.store_path).features(), open_store(b.store_path).features())


def test_layer_entries_expand_and_refuse_what_cannot_be(tmp_path, write_run_config):
    every = resolve_entry(EncoderEntry(encoder="tiny-vit-64", every=4))  # ViT-Ti: 12 blocks
    assert [s.feature_layer for s in every] == [-1, -5, -9]
    with pytest.raises(ConfigError, match="layer -13 does not exist; the model has 12 blocks"):
        resolve_entry(EncoderEntry(encoder="tiny-vit-64", layers=[-13]))
    with pytest.raises(ConfigError, match="layer -5 does not exist; the model has 4 stages"):
        resolve_entry(EncoderEntry(encoder="tiny-cnn-64", layers=[-5]))
    with pytest.raises(ValueError, match="apply to a model given by id"):
        EncoderEntry(encoder="tiny-vit-64", resolution=128)
    with pytest.raises(ValueError, match="one of layer, layers or every"):
        EncoderEntry(encoder="tiny-vit-64", layer=-1, every=2)
    path = write_run_config(encoders=[{"encoder": "tiny-vit-64", "layers": [-1, -2]}, "tiny-vit-64.L-1"])
    (tmp_path / "encoders").mkdir()
    (tmp_path / "encoders" / "tiny-vit-64.L-1.yaml").write_text(
        (Path("configs/encoders/tiny-vit-64.yaml").read_text()).replace(
            "name: tiny-vit-64", "name: tiny-vit-64.L-1"
        )
    )
    with pytest.raises(ConfigError, match="two entries are named 'tiny-vit-64.L-1'"):
        load_run_config(path)
    with pytest.raises(ConfigError, match="timm does not know model 'no_such_net'"):
        resolve_entry("timm:no_such_net")


def test_plan_runs_each_encoders_layers_in_one_pass(write_run_config):
    path = write_run_config(
        encoders=[{"encoder": "tiny-vit-64", "layers": [-1, -2]}, "tiny-vit-112", "tiny-vit-64"]
    )
    run = plan.build(load_run_config(path), path)
    val = [p for p, job in run.encode.items() if job.split == "val" and job.transform.name == "identity"]
    groups = [[run.encode[p].encoder.name for p in g] for g in run.one_pass_groups(val)]
    # -2 is the layer tiny-vit-64 reads: one encoder, listed twice
    assert groups == [["tiny-vit-64.L-1", "tiny-vit-64"], ["tiny-vit-112"]]
    # A name selects that encoder and its layers; a layer's name, that layer.
    only = plan.build(load_run_config(path), path, ["tiny-vit-64"])
    assert {j.encoder.name for j in only.encode.values()} == {"tiny-vit-64", "tiny-vit-64.L-1"}
    only = plan.build(load_run_config(path), path, ["tiny-vit-64.L-1"])
    assert {j.encoder.name for j in only.encode.values()} == {"tiny-vit-64.L-1"}


def _saved_timm_vit_with_registers(folder: Path) -> Path:
    _torchvision_shim.install()
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0, reg_tokens=4, img_size=64)
    save_file(model.state_dict(), folder / "model.safetensors")
    return folder / "model.safetensors"


def test_timm_model_by_id_derives_its_spec_and_counts_register_tokens(make_job, tmp_path):
    weights = _saved_timm_vit_with_registers(tmp_path)
    entry = EncoderEntry(encoder="timm:test_vit.r160_in1k", weights=str(weights), resolution=64,
                         model_kwargs={"reg_tokens": 4})  # fmt: skip
    (spec,) = resolve_entry(entry)
    assert (spec.name, spec.backend, spec.patch_size, spec.hidden_dim, spec.feature_layer) == (
        "test_vit.r160_in1k",
        "timm",
        16,
        64,
        -2,
    )
    assert spec.n_prefix_tokens is None  # not typed: counted on a forward pass
    (result,) = encode.run_layers(_jobs(make_job, [spec], tmp_path / "stores", 4), progress=False)
    recorded = open_store(result.store_path).attrs["encoder"]
    assert recorded["n_prefix_tokens_dropped"] == 5  # CLS + 4 registers
    assert recorded["weights_id"].startswith("file:model.safetensors sha256=")
    assert (recorded["family"], recorded["n_layers"], recorded["grid_hw"]) == ("vit", 6, [4, 4])


def _saved_hf_dinov2_with_registers(folder: Path) -> Path:
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
                                       patch_size=8, image_size=64, num_register_tokens=2)  # fmt: skip
    torch.manual_seed(0)
    Dinov2WithRegistersModel(config).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)  # fmt: skip
    return folder


def test_hf_model_by_id_through_the_users_loader(make_job, tmp_path):
    folder = _saved_hf_dinov2_with_registers(tmp_path / "dinov2-reg")
    entry = EncoderEntry(
        encoder="hf:facebook/dinov2-with-registers-small", weights=str(folder), layers=[-1, -3]
    )
    specs = resolve_entry(entry)
    assert [(s.name, s.patch_size, s.hidden_dim, s.resolution) for s in specs] == [
        ("dinov2-with-registers-small.L-1", 8, 32, 64),
        ("dinov2-with-registers-small.L-3", 8, 32, 64),
    ]
    results = encode.run_layers(_jobs(make_job, specs, tmp_path / "stores", 4), progress=False)
    recorded = [open_store(r.store_path).attrs["encoder"] for r in results]
    assert [r["n_prefix_tokens_dropped"] for r in recorded] == [3, 3]  # CLS + 2 registers, derived
    # The same values as transformers' own hidden_states of those layers.
    enc = encoders.load(specs[1])
    store = open_store(results[1].store_path)
    pixels = torch.from_numpy(store.pixels(slice(0, 2)))
    with torch.inference_mode():
        hidden = enc.model(pixel_values=enc.normalize(pixels), output_hidden_states=True).hidden_states[-3]
    expected = hidden[:, 3:].reshape(2, 8, 8, 32).numpy()
    np.testing.assert_allclose(store.features(slice(0, 2)), expected, rtol=2e-3, atol=2e-3)  # float16 store


def test_unsupported_models_say_what_was_found_and_what_is_supported(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="a 'resnet' model .* take CNNs from timm"):
        resolve_entry(EncoderEntry(encoder="hf:microsoft/resnet-50", weights=str(tmp_path)))
    with pytest.raises(ConfigError, match="no config.json found in .*hf download"):
        resolve_entry("hf:nobody/absent-model")


def test_a_tiny_cnn_and_its_layers_through_encode_train_evaluate(write_run_config, tmp_path):
    import pandas as pd

    path = write_run_config(
        splits=["train", "val"],
        encoders=[{"encoder": "tiny-cnn-64", "layers": [-1, -2]}, "tiny-vit-64"],
        train={"output_root": str(tmp_path / "train"), "epochs": 1, "batch_size": 8, "n_val_images": 4,
               "n_sample_images": 2, "shuffle_buffer_images": 8},
        evaluate={"output_root": str(tmp_path / "evaluate"), "judges": [], "n_boot": 200, "n_permutations": 200},
    )  # fmt: skip
    out = plan.execute(plan.build(load_run_config(path), path), with_operators=False)
    assert set(out["trained"]) == {"tiny-cnn-64.L-1", "tiny-cnn-64", "tiny-vit-64"}
    report = out["evaluation"]
    means = pd.read_csv(report.report_md.parent / "layerwise_means.csv")
    tests = pd.read_csv(report.report_md.parent / "layerwise_tests.csv")
    assert set(means["network"]) == {"tiny-cnn-64"}  # tiny-vit-64 is another network, alone
    assert sorted(means.drop_duplicates("encoder")["depth"]) == [3, 4]  # stages 3 and 4 of 4
    psnr = tests[(tests.judge == "pixels") & (tests.metric == "psnr_db")].iloc[0]
    assert (psnr["a"], psnr["b"], psnr["depth_a"], psnr["depth_b"]) == (
        "tiny-cnn-64",
        "tiny-cnn-64.L-1",
        3,
        4,
    )
    assert 0 <= psnr["holm_p_wilcoxon"] <= 1
    text = report.report_md.read_text()
    assert "Informativeness vs depth" in text and (report.report_md.parent / "depth.png").is_file()
