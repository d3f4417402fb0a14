"""The cost model (`reconlab plan --estimate`): FLOPs counted on the real architectures (known answers), bytes
from the store layout and the measured ratios, hours from the stated rates, and the CLI without the dataset."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline import plan
from pipeline.config.rates import Rates
from pipeline.config_files import REPO_CONFIG_DIR, load_model, load_run_config, resolve_encoder
from pipeline.cost_model import encoder_flops, estimate, reconstructor_flops


@pytest.fixture(scope="module")
def rates() -> Rates:
    return load_model(REPO_CONFIG_DIR / "rates.yaml", Rates)


def test_a_vits_forward_flops_are_counted_exactly(rates):
    # ViT-Ti/16 at 64 px: 16 patches + 1 class token, width 192, 12 blocks. Per block 24 N D^2 (qkv, proj,
    # MLP 4D) + 4 N^2 D (attention), 2 FLOPs per multiply-add; the patch embedding 2 x 16 x (3 x 16 x 16) x D.
    n, d = 17, 192
    expected = 12 * (24 * n * d * d + 4 * n * n * d) + 2 * 16 * 768 * d
    assert encoder_flops(resolve_encoder("tiny-vit-64"), rates) == expected
    # attention is quadratic in tokens: 112 px has 49 + 1 tokens
    n = 50
    assert (
        encoder_flops(resolve_encoder("tiny-vit-112"), rates)
        == 12 * (24 * n * d * d + 4 * n * n * d) + 2 * 49 * 768 * d
    )


def test_rows_follow_the_layout_the_counts_and_the_rates(write_run_config, rates):
    # one utilisation per stage here; by work per step in the next test
    rates = rates.model_copy(update={"gpu": rates.gpu.model_copy(update={"utilisation_by_step_tflop": {}})})
    config = write_run_config(splits=["train", "val"], store={"shard_images": 8, "precision": "float16"})
    cfg = load_run_config(config)
    run = plan.build(cfg, config, image_counts={"train": 1000, "val": 100})
    rows = {(r.stage, r.what.split()[0]): r for r in estimate(run, rates)}
    encode_train = rows["encode", "train"]
    spec = resolve_encoder("tiny-vit-64")
    stored = (
        4 * 4 * 192 * 2 * rates.stored_bytes.features["float16"] + 64 * 64 * 3 * rates.stored_bytes.pixels
    )
    assert encode_train.images == 1000 and encode_train.disk_gb == pytest.approx(1000 * stored / 1e9)
    peak = rates.gpu.peak_tflops * 1e12 * rates.gpu.utilisation["encode"]
    assert encode_train.compute_hours == pytest.approx(1000 * encoder_flops(spec, rates) / peak / 3600)
    train = rows["train", "train"]
    flops = 1000 * cfg.train.epochs * 3 * reconstructor_flops(cfg.train.model, spec, rates)
    assert train.compute_hours == pytest.approx(
        flops / (rates.gpu.peak_tflops * 1e12 * rates.gpu.utilisation["train"]) / 3600
    )
    assert train.gpu_hours == max(train.compute_hours, train.host_hours) > 0
    faster = rates.model_copy(
        update={"gpu": rates.gpu.model_copy(update={"peak_tflops": 2 * rates.gpu.peak_tflops})}
    )
    assert estimate(run, faster)[0].compute_hours == pytest.approx(encode_train.compute_hours / 2)

    # train.compile: true trains at torch.compile's measured utilisation
    compiled_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"compile": True})})
    compiled_run = plan.build(compiled_cfg, config, image_counts={"train": 1000, "val": 100})
    compiled = next(
        r for r in estimate(compiled_run, rates) if r.stage == "train" and r.what.startswith("train")
    )
    ratio = rates.gpu.utilisation["train"] / rates.gpu.utilisation["train_compiled"]
    assert compiled.compute_hours == pytest.approx(train.compute_hours * ratio) and ratio < 1
    assert f"x {rates.gpu.utilisation['train_compiled']:g} " in compiled.basis
    assert f"x {rates.gpu.utilisation['train']:g} " in train.basis


def test_a_train_rows_utilisation_is_read_off_the_measured_points_by_its_work_per_step(
    write_run_config, rates
):
    config = write_run_config()
    cfg = load_run_config(config)
    image_flops = 3 * reconstructor_flops(cfg.train.model, resolve_encoder("tiny-vit-64"), rates)
    step_tflop = cfg.train.batch_size * image_flops / 1e12

    def train_hours(points: dict, batch_size: int = cfg.train.batch_size) -> float:
        gpu = rates.gpu.model_copy(update={"utilisation_by_step_tflop": {"train": points}})
        batch_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": batch_size})})
        run = plan.build(batch_cfg, config, image_counts={"train": 1000, "val": 100})
        return next(
            r for r in estimate(run, rates.model_copy(update={"gpu": gpu})) if r.stage == "train"
        ).compute_hours

    def hours_at(share: float) -> float:
        return 1000 * cfg.train.epochs * image_flops / (rates.gpu.peak_tflops * 1e12 * share) / 3600

    around = {step_tflop / 10: 0.1, step_tflop * 10: 0.3}
    assert train_hours(around) == pytest.approx(hours_at(0.2))  # the log-midpoint
    assert train_hours(around, batch_size=cfg.train.batch_size * 1000) == pytest.approx(
        hours_at(0.3)
    )  # beyond
    assert train_hours({step_tflop * 100: 0.3, step_tflop * 1000: 0.5}) == pytest.approx(
        hours_at(0.3)
    )  # below


def test_plan_estimate_runs_without_the_dataset_and_says_what_is_assumed(write_run_config, tmp_path):
    config = write_run_config(dataset={"name": "absent", "kind": "folder", "root": str(tmp_path / "nowhere"),
                                       "splits": {s: {"images_dir": s} for s in ("train", "val")}})  # fmt: skip
    result = CliRunner().invoke(app, ["plan", "--config", str(config), "--estimate", "--images", "val=5000",
                                      "--images", "train=20000"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "total" in result.output and "assumed" in result.output and "measured" in result.output
    bad = CliRunner().invoke(app, ["plan", "--config", str(config), "--estimate", "--images", "val"])
    assert bad.exit_code != 0 and "split=N" in bad.output
    missing = CliRunner().invoke(app, ["plan", "--config", str(config), "--estimate", "--images", "train=5"])
    assert missing.exit_code != 0 and "no image count for split 'val'" in missing.output
    no_data = CliRunner().invoke(app, ["plan", "--config", str(config), "--estimate"])
    assert no_data.exit_code != 0 and "pass --images SPLIT=N" in no_data.output


def test_a_config_mistake_under_estimate_gets_no_dataset_hint(write_run_config):
    config = write_run_config(store={"precision": "bf16_bitround"})
    config.write_text(config.read_text().replace("bf16_bitround", "bf16_bitrond"))
    result = CliRunner().invoke(app, ["plan", "--config", str(config), "--estimate"])
    assert result.exit_code != 0 and "store.precision" in result.output and "--images" not in result.output


def test_a_utilisation_above_the_peak_in_a_rates_file_fails_naming_the_field(write_run_config, tmp_path):
    rates = tmp_path / "rates.yaml"
    rates.write_text(
        (REPO_CONFIG_DIR / "rates.yaml").read_text().replace("train_compiled: 0.11", "train_compiled: 1.1")
    )
    result = CliRunner().invoke(
        app, ["plan", "--config", str(write_run_config()), "--estimate", "--rates", str(rates)]
    )
    assert result.exit_code == 2 and "gpu.utilisation.train_compiled" in result.output, result.output


def test_plan_estimate_adds_columns_to_the_plan_table(write_run_config):
    config = write_run_config(encoders=["tiny-vit-64", {"encoder": "tiny-vit-112", "layers": [-1, -2]}])
    result = CliRunner().invoke(app, ["plan", "--config", str(config), "--estimate"])
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.startswith("stage"))
    assert "GPU h" in header and "disk GB" in header and "state" in header
    encode_rows = [line.split() for line in result.output.splitlines() if line.startswith("encode ")]
    layer_rows = [row for row in encode_rows if row[1] == "tiny-vit-112"]  # -2: the spec's own layer
    assert encode_rows and all(row[-1].replace(".", "").replace("e-", "").isdigit() for row in encode_rows)
    assert layer_rows and all(row[-2] == "0" for row in layer_rows)  # one pass with L-1: its time is there
    assert "per stage" in result.output and "total" in result.output


def test_the_studies_are_priced_per_network(rates):
    from pipeline.models import sae_training

    config = REPO_CONFIG_DIR / "demo.yaml"
    cfg = load_run_config(config)
    run = plan.build(cfg, config, image_counts={"train": 256, "val": 64})
    rows = {(r.stage, r.what.split()[0]): r for r in estimate(run, rates)}
    sae, n_sae = cfg.sae, len(sae_training.sae_specs(cfg.sae))
    width, tokens = 192, 7 * 7  # tiny-vit-112: 7x7 tokens of width 192
    flops = 3 * 256 * sae.epochs * n_sae * 4 * width * sae.expansion * width * tokens
    peak = rates.gpu.peak_tflops * 1e12 * rates.gpu.utilisation["train"]
    assert rows["sae", "networks"].compute_hours == pytest.approx(flops / peak / 3600)
    assert rows["sae", "networks"].disk_gb == pytest.approx(
        n_sae * 16 * 2 * width * sae.expansion * width / 1e9
    )
    assert rows["tokens", "networks"].compute_hours > 0 and rows["tokens", "evaluation"].images == 64
