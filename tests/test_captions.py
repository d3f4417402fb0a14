"""The text-encode stage on a tiny random CLIP (both towers) with a tokenizer trained here on the demo captions,
saved with save_pretrained and loaded back through the real code path; nothing is mocked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import EncodeOptions, EncoderSpec, SubsetSpec


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory, demo_root) -> EncoderSpec:
    import json

    from pipeline.models import _torchvision_shim

    _torchvision_shim.install()  # before transformers imports torchvision
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_clip")
    captions = [a["caption"] for split in ("train", "val")
                for a in json.loads((demo_root / "annotations" / f"captions_{split}.json").read_text())["annotations"]]  # fmt: skip
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator(
        captions, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    )
    PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)  # fmt: skip
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 32, "pad_token_id": 0, "bos_token_id": 2,
                     "eos_token_id": 3},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return EncoderSpec(name="tiny-clip-test", backend="transformers", model_id="tiny-random-clip", resolution=32,
                       patch_size=8, preprocessing_source="hf_image_processor", weights=str(folder), keep_head=True)  # fmt: skip


def test_captions_are_embedded_in_the_space_of_the_image_embeddings_and_found_again(
    tiny_clip, demo_dataset, tmp_path
):
    from pipeline.config import StoreOptions, TransformSpec
    from pipeline.models import text_towers
    from pipeline.stages import captions, encode
    from pipeline.stages.encode import EncodeJob
    from storage import open_store

    job = captions.CaptionJob(
        tmp_path, demo_dataset, "val", SubsetSpec(max_images=5), tiny_clip, batch_size=3
    )
    result = captions.run(job)
    from pipeline.data.caption_store import read

    stored = read(result.path)
    embeddings, image_ids, texts = stored.embeddings, stored.image_ids, stored.texts
    assert result.n_captions == len(texts) == len(embeddings) == len(image_ids) >= 5
    expected = text_towers.load(tiny_clip).embed(texts[:4])
    np.testing.assert_allclose(embeddings[:4], expected, rtol=1e-4, atol=1e-6)
    assert captions.run(job).already_complete
    image_job = EncodeJob(tmp_path, demo_dataset, "val", SubsetSpec(max_images=5), tiny_clip, TransformSpec(),
                          StoreOptions(shard_images=4), EncodeOptions(batch_size=4, num_workers=0, embeddings=True))  # fmt: skip
    store = open_store(encode.run(image_job, progress=False).store_path)
    assert store.embeddings().shape[1] == embeddings.shape[1] == 16  # one projected space
    assert set(image_ids) == set(store.image_ids())  # every caption describes an image of the store


def test_a_model_without_a_tokenizer_fails_before_any_work_saying_where_it_looked(
    tiny_clip, demo_dataset, tmp_path
):
    import shutil

    from pipeline.models.weights import WeightsNotFoundError
    from pipeline.stages import captions

    bare = tmp_path / "no_tokenizer"
    shutil.copytree(tiny_clip.weights, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    spec = tiny_clip.model_copy(update={"weights": str(bare)})
    with pytest.raises(WeightsNotFoundError, match="no tokenizer files"):
        captions.run(captions.CaptionJob(tmp_path, demo_dataset, "val", SubsetSpec(max_images=2), spec))


def test_an_embedding_sae_study_runs_through_the_plan_with_bridges_modality_and_stability(
    tiny_clip, demo_root, tmp_path, encode_and_train
):
    import pandas as pd
    import yaml

    from pipeline import checks, plan, plan_table
    from pipeline.config import ConfigError
    from pipeline.config_files import load_run_config
    from pipeline.stages import captions, sae

    data = {"store_root": str(tmp_path / "stores"), "dataset": {"name": "demo", "kind": "demo", "root": str(demo_root)},
            "encoders": [tiny_clip.model_dump(mode="json")], "store": {"shard_images": 16},
            "encode": {"batch_size": 16, "num_workers": 0, "embeddings": True},
            "train": {"output_root": str(tmp_path / "train"), "epochs": 1, "batch_size": 8, "n_val_images": 4},
            "sae": {"output_root": str(tmp_path / "sae"), "inputs": "embeddings", "variants": ["batchtopk"], "k": [4],
                    "expansion": 2, "epochs": 3, "batch_vectors": 16, "seeds": [0, 1], "text_shares": [0.5, 0.25],
                    "n_bridges": 3}}  # fmt: skip
    config = tmp_path / "run.yaml"
    run, checkpoint = encode_and_train(data, config, "sae")
    for caption_job in run.captions.values():
        captions.run(caption_job)
    result = sae.run(run.study_job(run.study_steps("sae")[0], checkpoint))
    report = result.report.read_text()
    assert "Top bridges" in report and "strongly unimodal" in report
    bridges = pd.read_csv(result.out_dir / "bridges.csv")
    assert len(bridges) == 3 and (bridges["image concept"] != bridges["text concept"]).all()
    stability = pd.read_csv(result.out_dir / "pareto.csv")
    assert {"batchtopk-k4-s0-t0.5", "batchtopk-k4-s1-t0.5", "batchtopk-k4-s0-t0.25"} <= set(stability.model)
    across = pd.read_csv(result.out_dir / "stability.csv").set_index("b")["across"].to_dict()
    assert across == {"batchtopk-k4-s1-t0.5": "seeds", "batchtopk-k4-s0-t0.25": "image:text mixes"}
    assert (result.out_dir / "per_modality.csv").is_file()
    for name in ("modality.png", "bridges.png", "pareto.png", "report.html"):
        assert (result.out_dir / name).is_file(), name
    rows = [s for s in plan_table.plan(load_run_config(config), config) if s.stage == "sae"]
    assert [r.state for r in rows] == ["cached"] * 4  # the two caption stores, the SAEs, the evaluation
    data["encode"]["embeddings"] = False
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="encode.embeddings"):
        checks.preflight(plan.build(load_run_config(config), config), ("encode", "train", "sae"))
