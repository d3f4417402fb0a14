"""What the CLI checks before Prefect starts: the config, the plan and all that its stages will need."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.config import ConfigError


def checked_plan(
    config: Path,
    stages: tuple[str, ...] = (),
    encoders: list[str] | None = None,
    transforms: list[str] | None = None,
    operators: bool = True,
):
    """Before Prefect starts: the config, every encoder spec (architecture vs weights), and all that `stages` will
    need (weights of encoders and judges, writable folders, held-out images, filters that select something).
    Returns the plan it checked (without `operators`: less the operators stage and the stores only it reads)."""
    from pipeline import checks, plan
    from pipeline.config_files import load_run_config

    run = plan.build(load_run_config(config), config, encoders)
    run = run if operators else run.without_operators()
    if "operators" in stages:
        run.operator_steps(transforms)
    if len(stages) == 3 and stages[-1] in plan.STUDIES:  # `reconlab tokens|sae`: the study must exist
        run.study_steps(stages[-1], encoders)
    checks.preflight(run, stages)
    from flows import prefect_env, reaper

    prefect_env.quiet_user_errors()
    reaper.start()  # what this run starts ends with it, even after a SIGKILL
    return run


def refusal(planned, operators: bool) -> str | None:
    """Why `reconlab run` would stop before any work (the checks every stage command makes), or None. The
    stage commands that do not reach the failing stage still run."""
    from pipeline import checks, plan
    from storage import StoreError

    stages = tuple(s for s in plan.STAGES if operators or s != "operators")
    try:
        checks.preflight(planned, stages, check_folders=False, load_weights=False)
    except (ConfigError, StoreError, OSError) as e:  # missing weights are a FileNotFoundError
        return str(e)
    return None


def image_counts(items: list[str]) -> dict[str, int]:
    counts = {}
    for item in items:
        split, _, n = item.partition("=")
        if not split or not n.isdigit() or int(n) == 0:
            raise typer.BadParameter(f"--images expects split=N with N > 0, got '{item}'")
        if split in counts:
            raise typer.BadParameter(f"--images gives split '{split}' twice")
        counts[split] = int(n)
    return counts
