"""Shared fixtures: a small demo dataset, tiny encoders, run configs in tmp dirs. Prefect runs offline in a tmp home."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

# Before anything imports prefect: keep it off the user's home and the network.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="reconlab-test-prefect-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.config import DatasetSpec, EncodeOptions, RunConfig, StoreOptions, SubsetSpec, TransformSpec
from pipeline.config_files import resolve_encoder
from pipeline.data import demo  # noqa: E402
from pipeline.stages.encode import EncodeJob  # noqa: E402

N_TRAIN, N_VAL = 40, 12


def pytest_configure(config):
    """On a machine with a GPU, the unmarked tests still run on the CPU (their `device: auto` would pick the GPU,
    where bf16 autocast and non-deterministic kernels change the exact values they compare); `-m gpu` runs the
    GPU tests. Set before anything asks CUDA for its devices, and inherited by the CLI subprocesses."""
    markexpr = config.option.markexpr or ""
    if "gpu" not in markexpr or "not gpu" in markexpr:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    return demo.build(tmp_path_factory.mktemp("data") / "demo", n_train=N_TRAIN, n_val=N_VAL)


@pytest.fixture(scope="session")
def demo_dataset(demo_root) -> DatasetSpec:
    return DatasetSpec(name="demo", kind="demo", root=demo_root)


@pytest.fixture(scope="session")
def study_root(tmp_path_factory) -> Path:
    """One folder for the study stages' end-to-end tests (tokens, sae): their stores and reconstructor are the same
    artifacts, made by the first and found by the second."""
    return tmp_path_factory.mktemp("studies")


@pytest.fixture(scope="session")
def encode_and_train():
    """A study's inputs from a run config: write `data` to `config`, plan and preflight the stages up to `study`,
    encode every store and train the config's one encoder; returns (plan, its reconstructor checkpoint)."""
    from pipeline import checks, plan
    from pipeline.config_files import load_run_config
    from pipeline.stages import encode, train

    def _run(data: dict, config: Path, study: str):
        config.write_text(yaml.safe_dump(data))
        run = plan.build(load_run_config(config), config)
        checks.preflight(run, ("encode", "train", study))
        for group in run.one_pass_groups(run.encode):
            encode.run_layers([run.encode[p] for p in group], progress=False)
        (train_job,) = run.train.values()
        return run, train.run(train_job, progress=False).checkpoint

    return _run


@pytest.fixture
def one_thread():
    """Bit-identical comparisons need one reduction order: the test's own runs use one torch thread, as must the
    subprocesses it compares them with."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_job(tmp_path, demo_dataset):
    """An EncodeJob over the small demo set with the tiny 64 px encoder; keyword overrides per test."""

    def _make(
        *,
        store_root: Path | None = None,
        dataset: DatasetSpec | None = None,
        split: str = "train",
        encoder: str = "tiny-vit-64",
        transform: TransformSpec = TransformSpec(),
        store: StoreOptions = StoreOptions(shard_images=8),
        options: EncodeOptions = EncodeOptions(batch_size=8, num_workers=0),
        subset: SubsetSpec = SubsetSpec(),
    ) -> EncodeJob:
        return EncodeJob(
            store_root=store_root or tmp_path / "stores",
            dataset=dataset or demo_dataset,
            split=split,
            subset=subset,
            encoder=resolve_encoder(encoder),
            transform=transform,
            store=store,
            options=options,
        )

    return _make


@pytest.fixture
def write_run_config(tmp_path, demo_root):
    """Write a run config YAML for the small demo set; returns its path."""

    def _write(**overrides) -> Path:
        data = {
            "store_root": str(tmp_path / "stores"),
            "dataset": {"name": "demo", "kind": "demo", "root": str(demo_root)},
            "splits": ["val"],
            "encoders": ["tiny-vit-64"],
            "store": {"shard_images": 8},
            "encode": {"batch_size": 8, "num_workers": 0},
        }
        data.update(overrides)
        RunConfig.model_validate(data)  # a test config that does not validate is a test bug
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return _write


@pytest.fixture
def processes_with():
    """The pids of live processes whose environment holds `KEY=value` (a tag a test's subprocess passes on to
    everything it starts), to check that nothing outlives a kill."""

    def find(env_entry: str) -> list[int]:
        pids = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if env_entry.encode() in environ.read_bytes().split(b"\0"):
                    pids.append(int(environ.parent.name))
            except OSError:  # ended meanwhile, or not ours to read
                continue
        return pids

    return find
