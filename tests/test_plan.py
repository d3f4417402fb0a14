"""The run plan names the same artifacts the stages make, and says what is cached, partial or still to run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipeline.config_files import load_run_config
from pipeline.plan import build
from pipeline.plan_table import plan
from pipeline.stages import encode, evaluate, train


def _config(write_run_config, tmp_path):
    return write_run_config(
        splits=["train", "val"],
        subset={"max_images": 8},
        train={"output_root": str(tmp_path / "train"), "epochs": 1, "batch_size": 4, "n_val_images": 4,
               "n_sample_images": 2, "shuffle_buffer_images": 4},
        operators={"output_root": str(tmp_path / "ops"), "pairs": [{"transform": {"name": "swap_rb"}}],
                   "n_fit_images": 4},
        evaluate={"output_root": str(tmp_path / "evaluate"), "judges": ["tiny-judge"]},
    )  # fmt: skip


def test_the_plan_follows_the_stages_from_nothing_to_cached(write_run_config, tmp_path):
    path = _config(write_run_config, tmp_path)
    cfg = load_run_config(path)
    before = plan(cfg, path)
    assert [(s.stage, s.what, s.state) for s in before if s.stage == "encode"] == [
        ("encode", "train identity", "to run"),
        ("encode", "val identity", "to run"),
        ("encode", "val swap_rb", "to run"),  # f(T x) for the operators stage is planned too
    ]
    assert {s.state for s in before if s.stage != "encode"} == {"after encode", "after train", "after scores"}
    jobs = list(build(cfg, path).encode.values())
    stores = {(j.split, j.transform.tag): encode.run(j, progress=False).store_path for j in jobs}
    result = train.run(train.TrainJob(stores[("train", "identity")], stores[("val", "identity")], cfg.train),
                       progress=False)  # fmt: skip
    after = {(s.stage, s.what): s for s in plan(cfg, path)}
    assert all(s.state == "cached" for (stage, _), s in after.items() if stage in ("encode", "train"))
    assert Path(after[("train", "train")].path) == result.run_dir  # the plan keys runs as the stage does
    assert after[("operators", "swap_rb forward")].state == "to run"
    assert Path(after[("encode", "val swap_rb")].path) == stores[("val", "swap_rb")]

    # evaluate: the scores' key without loading the judges, then the report's from the score files
    assert (after[("evaluate", "scores on val")].state, after[("evaluate", "report of 1 encoders")].state) == (
        "to run", "after scores")  # fmt: skip
    run = build(cfg, path)
    (target,) = run.eval_targets({"tiny-vit-64": Path(result.checkpoint)})
    _, scores, _ = evaluate.score_encoder(target, evaluate.load_judges(run.judges, "cpu"), cfg.evaluate)
    after = {(s.stage, s.what): s for s in plan(cfg, path)}
    assert (after[("evaluate", "scores on val")].state, after[("evaluate", "scores on val")].path) == (
        "cached", str(scores))  # fmt: skip
    report = after[("evaluate", "report of 1 encoders")]
    assert (report.state, report.path) == ("to run", str(evaluate.report_dir([scores], cfg.evaluate)[1]))
    other = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"pixel_resolution": 32})})
    assert [s.state for s in plan(other, path) if s.stage == "evaluate"] == ["to run", "after scores"]


def test_plan_command_prints_the_table_and_runs_nothing(write_run_config, tmp_path):
    path = _config(write_run_config, tmp_path)
    out = CliRunner().invoke(app, ["plan", "--config", str(path)])
    assert out.exit_code == 0, out.output
    assert out.output.splitlines()[0].split()[:3] == ["stage", "encoder", "split"]
    assert "to run" in out.output and "after encode" in out.output
    assert not (tmp_path / "stores").exists()
    priced = CliRunner().invoke(app, ["plan", "--config", str(path), "--estimate"])
    line = next(x for x in priced.output.splitlines() if x.startswith("still to run"))
    left, total = line.split(": ", 1)[1].split(" of ")  # nothing is cached yet: all of it is still to run
    assert priced.exit_code == 0 and left == total.removesuffix(" in all"), line


def test_plan_says_when_run_would_refuse_the_config_and_still_prints_the_table(write_run_config, tmp_path):
    path = write_run_config(
        encoders=["tiny-vit-64"], splits=["train", "val"]
    )  # evaluation needs two encoders
    out = CliRunner().invoke(app, ["plan", "--config", str(path)])
    assert out.exit_code == 0 and "stage" in out.output.splitlines()[0], out.output
    assert out.output.splitlines()[-1].startswith("note: `reconlab run` refuses this config as it is: evaluation "
                                                  "compares encoders, this run evaluates 1 (tiny-vit-64)")  # fmt: skip
    assert not (tmp_path / "stores").exists() and not (tmp_path / "train").exists()  # no folder made
    fixed = write_run_config(encoders=["tiny-vit-64", "tiny-vit-112"], splits=["train", "val"],
                             operators={"output_root": str(tmp_path / "ops"), "n_fit_images": 4},
                             evaluate={"output_root": str(tmp_path / "eval"), "judges": ["tiny-judge"]})  # fmt: skip
    out = CliRunner().invoke(app, ["plan", "--config", str(fixed)])
    assert out.exit_code == 0 and "refuses" not in out.output, out.output


def test_ls_lists_every_kind_of_artifact_with_its_status(write_run_config, tmp_path):
    path = _config(write_run_config, tmp_path)
    cfg = load_run_config(path)
    job = list(build(cfg, path).encode.values())[0]
    store = encode.run(job, progress=False).store_path
    run = train.run(train.TrainJob(store, store, cfg.train), progress=False)
    killed = tmp_path / "train" / "tiny-vit-64__0123456789abcdef"  # a run killed before its first epoch ended
    (killed / "checkpoints").mkdir(parents=True)
    later = (
        tmp_path / "train" / "tiny-vit-64__fedcba9876543210"
    )  # killed in epoch 7: keep_last 2 kept two files
    (later / "checkpoints").mkdir(parents=True)
    for epoch in (4, 5):
        (later / "checkpoints" / f"epoch-{epoch:04d}.json").write_text("{}")
    fit = (
        tmp_path / "operators" / "tiny-vit-64__swap_rb-forward__0123456789abcdef"
    )  # killed after one fit's record
    fit.mkdir(parents=True)
    (fit / "procrustes.json").write_text(json.dumps({"fit": "procrustes", "transform": {"name": "swap_rb"},
                                                     "direction": "forward", "source_store": str(store)}))  # fmt: skip
    out = CliRunner().invoke(app, ["ls", str(tmp_path)])
    assert out.exit_code == 0, out.output
    rows = {line.split()[-1]: line for line in out.output.splitlines()[2:]}
    assert rows[str(store)].startswith("store ") and " complete " in rows[str(store)]
    assert rows[str(run.run_dir)].startswith("training run") and " complete " in rows[str(run.run_dir)]
    assert (
        "partial (0 epoch(s) done)" in rows[str(killed)] and "partial (6 epoch(s) done)" in rows[str(later)]
    )
    assert rows[str(fit)].startswith("operator fit") and " partial " in rows[str(fit)]
    assert CliRunner().invoke(app, ["ls", str(tmp_path / "nothing")]).exit_code == 2


def test_force_removes_a_stage_and_every_later_one_so_the_plan_runs_them_again(write_run_config, tmp_path):
    from pipeline.config import ConfigError
    from pipeline.plan_table import force

    path = _config(write_run_config, tmp_path)
    cfg = load_run_config(path)
    stores = {
        (j.split, j.transform.tag): encode.run(j, progress=False).store_path
        for j in list(build(cfg, path).encode.values())
    }
    run = train.run(train.TrainJob(stores[("train", "identity")], stores[("val", "identity")], cfg.train),
                    progress=False)  # fmt: skip
    from pipeline.artifacts import WriteLock
    from storage import StoreError

    with WriteLock(run.run_dir), pytest.raises(StoreError, match="another run .* is writing"):
        force(cfg, path, "encode")  # one artifact is being written: nothing at all is removed
    assert all(store.is_dir() for store in stores.values()) and run.run_dir.is_dir()
    from pipeline.artifacts import reading

    with (
        reading(stores[("val", "identity")]),
        pytest.raises(StoreError, match=r"another run \(pid \d+\) is reading"),
    ):
        force(cfg, path, "encode")  # a stage reads one store (the train stage holds this while it trains)
    assert all(store.is_dir() for store in stores.values()) and run.run_dir.is_dir()
    assert force(cfg, path, "train") == [run.run_dir]
    states = {(s.stage, s.what): s.state for s in plan(cfg, path)}
    assert states[("train", "train")] == "to run" and states[("encode", "train identity")] == "cached"
    assert states[("operators", "swap_rb forward")] == "after train"
    from pipeline.artifacts import write_json_atomic

    scores_dir = Path(cfg.evaluate.output_root) / "scores"  # a finished evaluation, as its files look
    scores_dir.mkdir(parents=True)
    scores = scores_dir / "tiny-vit-64__0123456789abcdef.parquet"
    scores.write_bytes(b"scores")
    write_json_atomic(
        scores.with_suffix(".json"), {"store": str(next(iter(build(cfg, path).evaluate.values())))}
    )
    made_from_them, other = (Path(cfg.evaluate.output_root) / f"report__{h}" for h in ("aaaa", "bbbb"))
    for report, used in ((made_from_them, scores.stem), (other, "another-encoder__ffff")):
        report.mkdir()
        write_json_atomic(report / "result.json", {"key": {"scores": [used]}})
    assert force(cfg, path, "operators") == [] and scores.exists()  # evaluate reads no operator fit
    with pytest.raises(ConfigError, match="--force sae: this run config has no sae: section"):
        force(cfg, path, "sae")
    assert sorted(force(cfg, path, "evaluate")) == sorted([made_from_them, scores])
    assert not scores.exists() and not scores.with_suffix(".json").exists() and other.is_dir()
    try:
        force(cfg, path, "trian")
    except ConfigError as e:
        assert "unknown stage 'trian'; stages: encode, train, operators, evaluate" in str(e)
    else:
        raise AssertionError("a misspelled stage must be refused")


def test_a_wrong_encoder_spec_is_refused_by_the_plan_naming_its_yaml_file(write_run_config, tmp_path):
    import yaml

    from pipeline.config import ConfigError
    from pipeline.config_files import REPO_CONFIG_DIR

    spec = yaml.safe_load((REPO_CONFIG_DIR / "encoders" / "tiny-vit-64.yaml").read_text())
    config = write_run_config(encoders=["my-vit"])
    (config.parent / "encoders").mkdir(exist_ok=True)
    mine = config.parent / "encoders" / "my-vit.yaml"
    mine.write_text(yaml.safe_dump({**spec, "name": "my-vit", "patch_size": 8}))  # encoded before it failed
    with pytest.raises(
        ConfigError, match=rf"^{mine}: encoder 'my-vit': patch_size 8, but .* patches of 16 px"
    ):
        build(load_run_config(config), config, image_counts={"train": 8, "val": 8})


def test_a_finished_store_with_non_finite_features_is_refused_before_any_stage(write_run_config, tmp_path):
    import zarr

    from pipeline.checks import preflight
    from storage import StoreError

    path = _config(write_run_config, tmp_path)
    run = build(load_run_config(path), path)
    store = next(encode.run(j, progress=False).store_path for j in run.encode.values() if j.split == "train")
    preflight(run, ("encode", "train"), check_folders=False)
    group = zarr.open_group(str(store), mode="r+")
    group.attrs["feature_stats"] = {**group.attrs["feature_stats"], "n_nonfinite": 3}
    # the plan listed it cached, and `run` refused it only when train opened it
    with pytest.raises(StoreError, match="the encoder gave 3 non-finite .*`reconlab run --force encode`"):
        preflight(run, ("encode", "train"), check_folders=False)


def test_list_valued_model_kwargs_are_planned_and_loaded(write_run_config, tmp_path):
    import yaml

    spec = yaml.safe_load((Path(__file__).parents[1] / "configs/encoders/tiny-cnn-64.yaml").read_text())
    config = write_run_config(encoders=["my-cnn"])
    (config.parent / "encoders").mkdir(exist_ok=True)
    # YAML lists (ConvNeXt depths/dims, SAM global_attn_indexes) once failed as "unhashable type: 'list'"
    kwargs = {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32]}
    spec |= {"name": "my-cnn", "model_kwargs": kwargs, "hidden_dim": 24}
    (config.parent / "encoders" / "my-cnn.yaml").write_text(yaml.safe_dump(spec))

    run = build(load_run_config(config), config, image_counts={"train": 8, "val": 8})

    job = next(job for job in run.encode.values() if job.split == "val")
    assert job.encoder.model_kwargs == kwargs
    from storage import open_store

    assert open_store(encode.run(job, progress=False).store_path).features().shape[1:] == (4, 4, 24)


def test_a_spec_given_by_path_that_its_network_contradicts_is_named_by_that_path(write_run_config, tmp_path):
    import yaml

    from pipeline.config import ConfigError

    spec = yaml.safe_load((Path(__file__).parents[1] / "configs/encoders/tiny-vit-64.yaml").read_text())
    path = tmp_path / "elsewhere" / "my-vit.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(spec | {"name": "my-vit", "hidden_dim": 999}))
    config = write_run_config(encoders=[str(path)])
    with pytest.raises(ConfigError, match=rf"^{path}: encoder 'my-vit': hidden_dim 999"):
        build(load_run_config(config), config, image_counts={"train": 8, "val": 8})


def test_the_layer_an_encoder_reads_is_that_encoder_once_not_a_second_store(write_run_config):
    config = write_run_config(encoders=["tiny-vit-64", {"encoder": "tiny-vit-64", "layers": [-1, -2]}])

    run = build(load_run_config(config), config, image_counts={"train": 8, "val": 8})

    paths = [p for p, job in run.encode.items() if job.split == "val" and job.transform.name == "identity"]
    names = [run.encode[p].encoder.name for p in paths]
    assert sorted(names) == ["tiny-vit-64", "tiny-vit-64.L-1"]
    assert len(run.one_pass_groups(paths)) == 1  # both still from one forward pass


def test_weights_of_another_model_are_refused_before_any_encoder_runs(write_run_config, tmp_path):
    import yaml
    from safetensors.torch import save_file

    from flows.cli import app as cli
    from pipeline.models import _torchvision_shim

    _torchvision_shim.install()  # before timm (platform notes)
    import timm

    spec = yaml.safe_load((Path(__file__).parents[1] / "configs/encoders/tiny-vit-64.yaml").read_text())
    convnext = timm.create_model("test_convnext", num_classes=0)
    save_file(convnext.state_dict(), str(tmp_path / "convnext.safetensors"))
    (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "convnext.safetensors").read_bytes()[:5000])
    (tmp_path / "encoders").mkdir()
    for name, weights in [("other-model", "convnext.safetensors"), ("cut-short", "truncated.safetensors")]:
        (tmp_path / "encoders" / f"{name}.yaml").write_text(
            yaml.safe_dump({**spec, "name": name, "weights": str(tmp_path / weights)})
        )
        config = write_run_config(encoders=["tiny-vit-64", name])  # the good encoder first

        result = CliRunner().invoke(cli, ["encode", "--config", str(config)])

        assert result.exit_code == 2, result.output
        message = result.output.strip()
        assert "\n" not in message and message.startswith(
            f"encoder '{name}': the weights in '{tmp_path / weights}'"
        )
        assert "do not load into timm model 'vit_tiny_patch16_224'" in message
        assert not list((tmp_path / "stores").glob("*.zarr"))  # refused before tiny-vit-64 was encoded


def test_no_operators_plans_and_encodes_none_of_the_stores_only_the_operators_read(
    write_run_config, tmp_path
):
    config = _config(write_run_config, tmp_path)  # operators fit swap_rb on val
    full = build(load_run_config(config), config)
    lean = full.without_operators()
    swapped = [p for p, job in full.encode.items() if job.transform.name == "swap_rb"]
    assert swapped and not set(swapped) & set(lean.encode) and not lean.operators
    assert set(lean.encode) == set(full.encode) - set(swapped)  # train, val (evaluated) and the rest stay
    listed = CliRunner().invoke(app, ["plan", "--config", str(config), "--no-operators"])
    assert listed.exit_code == 0 and "swap_rb" not in listed.output, listed.output
    assert "swap_rb" in CliRunner().invoke(app, ["plan", "--config", str(config)]).output
