"""The demo shows a finding, not only machinery: an encoder that by construction never sees colour (tiny-vit-64
fed grayscale copies, tiny-vit-64-gray) is ranked below the same encoder fed colour on PSNR, Holm-adjusted p < 0.05,
on the demo set with the demo config's own schedule."""

from __future__ import annotations

import pytest

from pipeline import plan
from pipeline.config import DatasetSpec
from pipeline.config_files import REPO_CONFIG_DIR, load_run_config
from pipeline.data import demo
from pipeline.science import stats
from pipeline.stages import encode, evaluate, train


@pytest.mark.slow
def test_the_encoder_that_never_sees_colour_ranks_below_the_intact_one_on_psnr(tmp_path):
    config = REPO_CONFIG_DIR / "demo.yaml"
    cfg = load_run_config(config)
    root = demo.build(tmp_path / "demo")  # the full demo set: 256 train / 64 val images
    cfg = cfg.model_copy(update={
        "store_root": tmp_path / "stores",
        "dataset": DatasetSpec(name="demo", kind="demo", root=root),
        "train": cfg.train.model_copy(update={"output_root": tmp_path / "train"}),
        "evaluate": cfg.evaluate.model_copy(update={"output_root": tmp_path / "eval", "judges": []}),
    })  # fmt: skip
    scores = {}
    for name in ("tiny-vit-64", "tiny-vit-64-gray"):
        jobs = [j for j in plan.jobs_from_config(cfg, config, [name]) if j.transform.name == "identity"]
        stores = {j.split: encode.run(j, progress=False).store_path for j in jobs}
        run = train.run(train.TrainJob(stores["train"], stores["val"], cfg.train), progress=False)
        target = evaluate.EvalTarget(name, stores["val"], run.checkpoint)
        table, _, _ = evaluate.score_encoder(target, {}, cfg.evaluate)
        scores[name] = table[table.metric == "psnr_db"].set_index("image_id")["value"]
    result = stats.compare("tiny-vit-64", scores["tiny-vit-64"], "tiny-vit-64-gray", scores["tiny-vit-64-gray"],
                           n_boot=2000, seed=0)  # fmt: skip
    assert result.n_pairs == 64 and result.mean_diff > 0, result
    assert result.wilcoxon_p < 0.05 and result.permutation_p < 0.05, result


def test_an_input_transform_changes_what_the_encoder_sees_not_the_stored_targets(make_job):
    import numpy as np

    from pipeline.config import SubsetSpec
    from pipeline.data.transforms import resample
    from pipeline.stages.verify import verify
    from storage import open_store

    intact, gray = (
        open_store(
            encode.run(make_job(encoder=name, subset=SubsetSpec(max_images=4)), progress=False).store_path
        )
        for name in ("tiny-vit-64", "tiny-vit-64-gray")
    )
    assert np.array_equal(intact.pixels(), gray.pixels())  # the same colour targets
    assert not np.allclose(intact.features(), gray.features())
    assert gray.attrs["encoder"]["input_transform"] == "grayscale"
    assert not verify(gray.path, n_images=2, device="cpu").mismatches  # verify re-applies the input transform
    checker = (np.indices((8, 8)).sum(axis=0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, axis=-1)
    assert np.ptp(resample(checker, factor=2)) == 0  # detail finer than the factor is gone
