"""The `reconlab` command line: run stages as Prefect flows, inspect feature stores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from flows import results_out
from flows.errors import OneValueEach, reported_in_one_line
from flows.errors import fail as _fail
from flows.preflight import checked_plan, image_counts, refusal
from flows.store_cli import ls, ls_artifacts, store_app
from pipeline.config import ConfigError
from pipeline.config_files import REPO_CONFIG_DIR

EncoderFilter = Annotated[
    list[str] | None, typer.Option("--encoder", "-e", help="Only these encoders (NAME: it and its layers).")
]

app = typer.Typer(cls=OneValueEach, no_args_is_help=True, add_completion=False, help=__doc__)
app.add_typer(store_app, name="store")

DEMO_CONFIG = REPO_CONFIG_DIR / "demo.yaml"


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"reconlab {version('reconlab')}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Measure what vision encoders keep in their features by reconstructing images from them."""


@app.command()
def encode(
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config YAML.")],
    encoder: EncoderFilter = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Encode every store the run needs (the plan's encode rows: splits x transforms per encoder, and the transformed
    copies the operators fit on) into feature stores; resumes partial stores and re-encodes damaged shards."""

    with reported_in_one_line(stoppable=True):
        from flows.encode_flow import encode_flow
        from flows.tasks import for_config

        checked_plan(config, ("encode",), encoder)
        results = for_config(encode_flow, config)(str(config), encoder, progress)
    for r in results:
        state = "already complete" if r.already_complete else "encoded"
        typer.echo(f"{r.store_path}: {state}, {r.n_encoded}/{r.n_images} images, {r.n_failed} failed")
        if r.seconds:
            typer.echo(f"  time {r.timing()}")


@app.command()
def train(
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config YAML.")],
    encoder: EncoderFilter = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    prefect: Annotated[
        bool, typer.Option(help="Run as a Prefect flow; --no-prefect under torchrun (stores must exist).")
    ] = True,
) -> None:
    """Train a reconstructor per encoder on its train store (encoding first if needed); resumes killed runs."""

    with reported_in_one_line(stoppable=True):
        checked_plan(config, ("encode", "train"), encoder)
        if prefect:
            from flows.tasks import for_config
            from flows.train_flow import train_flow

            results = list(for_config(train_flow, config)(str(config), encoder, progress).values())
        else:
            results = _train_without_prefect(config, encoder, progress)
    results_out.echo_trained(results)


def _train_without_prefect(config: Path, encoder_names: list[str] | None, progress: bool):
    from pipeline import plan
    from pipeline.config_files import load_run_config
    from pipeline.stages import train as train_stage

    run = plan.build(load_run_config(config), config, encoder_names)
    return [train_stage.run(job, progress=progress) for job in run.train.values()]


@app.command()
def reconstruct(
    store: Annotated[Path, typer.Option("--store", help="Feature store (*.zarr).")],
    checkpoint: Annotated[
        Path,
        typer.Option(
            "--checkpoint", help="A training run folder (its chosen checkpoint), or a checkpoint .json."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNGs.")],
    n: Annotated[int, typer.Option("--n", min=1, help="Number of images.")] = 8,
) -> None:
    """Write PNGs of original | reconstruction for a store's first N images."""
    from pipeline.stages.reconstruct import write_side_by_side

    with reported_in_one_line():
        paths = write_side_by_side(store, checkpoint, out, n)
    typer.echo(f"wrote {len(paths)} PNGs to {out}")


@app.command("operators")
def operators_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config YAML.")],
    transform: Annotated[
        list[str] | None, typer.Option("--transform", "-t", help="Only these transforms.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Fit feature-space operators (swap, channel scaling, colorization) and write their plots and grids."""

    with reported_in_one_line(stoppable=True):
        from flows.operators_flow import operators_flow
        from flows.tasks import for_config

        checked_plan(config, ("encode", "train", "operators"), transforms=transform)
        results = for_config(operators_flow, config)(str(config), transform, progress)
    results_out.echo_operators(results)


@app.command()
def evaluate(
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config YAML.")],
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Score held-out reconstructions of every encoder, compare and rank them, and write the report."""

    with reported_in_one_line(stoppable=True):
        from flows.evaluate_flow import evaluate_flow
        from flows.tasks import for_config

        checked_plan(config, ("encode", "train", "evaluate"))
        result = for_config(evaluate_flow, config)(str(config), progress)
    results_out.echo_evaluation(result)


@app.command("tokens")
def tokens_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config YAML (with a tokens: section).")],
    encoder: EncoderFilter = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Token utility: train the learned token selector and the baselines' completions, compare them on held-out
    images in feature space and through the reconstructor, and write the report (docs/tokens.md)."""

    with reported_in_one_line(stoppable=True):
        from flows.study_flows import tokens_flow
        from flows.tasks import for_config

        checked_plan(config, ("encode", "train", "tokens"), encoders=encoder)
        results = for_config(tokens_flow, config)(str(config), encoder, progress)
    results_out.echo_studies("token utility", results)


@app.command("sae")
def sae_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config YAML (with an sae: section).")],
    encoder: EncoderFilter = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Sparse autoencoders on an encoder's patch tokens: a sparsity sweep per variant, held-out fidelity and the
    Pareto table, stability across seeds, and concepts edited and seen through the reconstructor (docs/sae.md)."""

    with reported_in_one_line(stoppable=True):
        from flows.study_flows import sae_flow
        from flows.tasks import for_config

        checked_plan(config, ("encode", "train", "sae"), encoders=encoder)
        results = for_config(sae_flow, config)(str(config), encoder, progress)
    results_out.echo_studies("SAE study", results)


@app.command("plan")
def plan_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config YAML.")],
    operators: Annotated[bool, typer.Option(help="Include the operators stage.")] = True,
    estimate: Annotated[
        bool, typer.Option("--estimate", help="Add GPU-hours and disk per artifact (docs/benchmarks.md).")
    ] = False,
    images: Annotated[
        list[str] | None,
        typer.Option(
            help="split=N: estimate without the dataset, e.g. --images train=118287 --images val=5000."
        ),
    ] = None,
    rates: Annotated[Path | None, typer.Option(help="Rates file (default: configs/rates.yaml).")] = None,
) -> None:
    """Print what a run would do, stage by stage: each store, training run and operator fit, where it lives and
    whether it is cached, partial or to run; with --estimate, what each costs. Runs nothing."""
    with reported_in_one_line():
        counts = image_counts(images) if images else None
        if counts is not None and not estimate:
            raise typer.BadParameter(
                "--images applies to --estimate only (the plan lists the dataset itself)"
            )
        if counts is not None:  # no dataset to plan from: the estimate alone
            from pipeline import plan
            from pipeline.config_files import load_run_config

            unlisted = plan.build(load_run_config(config), config, image_counts=counts)
            unlisted = unlisted if operators else unlisted.without_operators()
            if unused := sorted(set(counts) - {job.split for job in unlisted.encode.values()}):
                raise typer.BadParameter(f"--images gives split(s) {unused} that this run does not use; it uses "
                                         f"{sorted({job.split for job in unlisted.encode.values()})}")  # fmt: skip
            results_out.echo_estimate(*results_out.estimates(unlisted, rates, operators))
            return
        from pipeline.config_files import load_run_config

        load_run_config(config)  # a config's own mistakes get no dataset hint
        try:
            planned = checked_plan(config, operators=operators)
        except ConfigError as e:
            hint = (
                "; to estimate without the dataset, pass --images SPLIT=N for each split" if estimate else ""
            )
            raise ConfigError(f"{e}{hint}") from None
        estimated = results_out.estimates(planned, rates, operators) if estimate else None
        results_out.echo_run_plan(config, planned, operators, estimated)
        if why := refusal(planned, operators):
            typer.echo(f"\nnote: `reconlab run` refuses this config as it is: {why}")


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config YAML.")],
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    operators: Annotated[bool, typer.Option(help="Include the operators stage.")] = True,
    force: Annotated[
        str | None,
        typer.Option(
            "--force",
            help="Redo this stage (encode, train, operators, evaluate, tokens, sae) and the stages that use it.",
        ),
    ] = None,
) -> None:
    """The whole benchmark: encode, train, operators, evaluate, and the token and SAE studies where the config has
    them (one Prefect flow; finished work is skipped)."""

    with reported_in_one_line(stoppable=True):
        from flows.benchmark_flow import benchmark_flow
        from flows.tasks import for_config

        planned = checked_plan(
            config,
            ("encode", "train", "operators", "evaluate", "tokens", "sae")
            if operators
            else ("encode", "train", "evaluate", "tokens", "sae"),
            operators=operators,
        )
        if force is not None:  # --force "" is a mistake, not no --force
            from pipeline.config_files import load_run_config
            from pipeline.plan_table import force as force_stage

            for removed in force_stage(load_run_config(config), config, force):
                typer.echo(f"--force {force}: removed {removed}")
        steps = results_out.echo_run_plan(config, planned, operators)
        if not os.environ.get("PREFECT_API_URL") and all(
            s.state == "cached" for s in steps if s.stage != "evaluate"
        ):
            # Nothing to orchestrate: skip the ~10 s of Prefect's temporary server (a configured server still
            # gets the run, for its record).
            typer.echo(
                "\nnothing to encode, train or fit: results read from their artifacts (Prefect not started)"
            )
            from pipeline import plan

            out = plan.execute(planned, operators, progress)
        else:
            out = for_config(benchmark_flow, config)(str(config), progress, operators)
    from pipeline.config_files import load_run_config

    ls(load_run_config(config).store_root)
    results_out.echo_trained(out["trained"].values())
    results_out.echo_operators(out["operators"])
    results_out.echo_evaluation(out["evaluation"])
    results_out.echo_studies("token utility", out["tokens"])
    results_out.echo_studies("SAE study", out["sae"])


@app.command()
def serve(
    config: Annotated[Path, typer.Option("--config", "-c", help="Run config YAML.")],
    cron: Annotated[
        str | None,
        typer.Option(help="Cron schedule of the whole benchmark, e.g. '0 2 * * *' (nightly at 02:00)."),
    ] = None,
    pause_on_stop: Annotated[
        bool, typer.Option(help="Pause the schedule when this process stops (Prefect's default).")
    ] = False,
) -> None:
    """Serve a deployment per stage (encode, train, operators, evaluate, tokens, sae) and the benchmark for CONFIG, until
    stopped: trigger them from the Prefect UI or `prefect deployment run` (needs a Prefect server: docs/flows.md)."""
    import os

    if not os.environ.get("PREFECT_API_URL"):
        _fail(
            "serving needs a Prefect server: run `prefect server start --host 127.0.0.1 --port 4200` and "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` first (ephemeral mode cannot serve or schedule)"
        )
    from flows import prefect_env

    if not prefect_env.server_answers(os.environ["PREFECT_API_URL"]):
        _fail(
            f"no Prefect server answers at PREFECT_API_URL={os.environ['PREFECT_API_URL']}: start it (`prefect "
            "server start --host 127.0.0.1 --port 4200`) or point PREFECT_API_URL at the one you run"
        )
    with reported_in_one_line():
        checked_plan(config)
        from flows.deployments import deployments
        from flows.deployments import serve as serve_deployments

        served = deployments(config, cron)
    kept = ("stopping pauses it." if pause_on_stop else "it stays active when this process stops: its runs wait "
            "(Late) until `reconlab serve` serves them again.")  # fmt: skip
    typer.echo(f"serving {len(served)} deployments of {config.resolve()}; stop with Ctrl-C or SIGTERM. "
               + (f"The benchmark runs on the schedule '{cron}' (cron, UTC); {kept}" if cron else
                  "No schedule (--cron adds one to the benchmark)."))  # fmt: skip
    serve_deployments(served, pause_on_stop)


@app.command()
def demo(progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True) -> None:
    """Build the demo set, then the whole benchmark on it: encode, train, operators, evaluate, tokens, sae."""
    run(DEMO_CONFIG, progress, True)


app.command("ls")(ls_artifacts)


if __name__ == "__main__":
    app()
