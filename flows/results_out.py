"""What the CLI prints after each stage: one line per training run, a terminal-wide table per operator fit, the
rankings, and where each report is."""

from __future__ import annotations

import typer


def echo_trained(results) -> None:
    for r in results:
        m = r.val_metrics
        state = "already trained" if r.already_complete else "trained"
        typer.echo(
            f"{r.run_dir}: {state}; val PSNR {m['val_psnr_db']:.2f} dB, SSIM {m['val_ssim']:.3f}, "
            f"MSE {m['val_mse']:.4f}; checkpoint {r.checkpoint}"
        )


def echo_operators(results) -> None:
    """Each fit in one terminal-wide line; every column is in fits.csv / fits.md and the report."""
    import pandas as pd

    for r in results:
        typer.echo(f"\n{r.out_dir}{' (cached)' if r.already_complete else ''}")
        typer.echo(operator_summary(pd.DataFrame(r.table)))
        typer.echo((r.out_dir / "fits.md").read_text().rstrip().splitlines()[-1])  # the paper's prediction


def operator_summary(frame) -> str:
    import pandas as pd

    def count(column):
        return frame[column].map(lambda v: "-" if v != v else str(int(v))) if column in frame else "-"

    short = {"fit": frame["fit"], "PSNR dB": frame.get("psnr_db"), "SSIM": frame.get("ssim"),
             "resid": frame.get("residual_test"), "T∘T err": frame.get("involution_error"),
             "λ in/on/out": count("n_inside_unit_circle") + "/" + count("n_on_unit_circle") + "/"
             + count("n_outside_unit_circle"),
             "ρ": frame.get("spectral_radius")}  # fmt: skip
    table = pd.DataFrame({k: v for k, v in short.items() if v is not None})
    table["λ in/on/out"] = table["λ in/on/out"].replace("-/-/-", "-")
    return table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")


def echo_studies(kind: str, results) -> None:
    for r in results:
        state = "cached" if r.already_complete else "written"
        typer.echo(f"\n{kind} ({state}): {r.report}\n        {r.report.with_suffix('.html')}")


def echo_evaluation(result) -> None:
    rankings = result.analysis["rankings"]
    # The primary (judge) ranking, and PSNR, which no judge's blind spots (e.g. grayscale judging) can hide.
    for key in dict.fromkeys([result.analysis["primary"], ("pixels", "psnr_db")]):
        if key in rankings:
            typer.echo(f"\nranking by {key[0]} / {key[1]}:")
            typer.echo(rankings[key].to_string(index=False))
    state = " (cached: the same scores and settings made it before)" if result.already_complete else ""
    typer.echo(f"\nreport{state}: {result.report_md}\n        {result.report_html}")


def estimates(run, rates_path, with_operators: bool):
    """(rows, rates) of `reconlab plan --estimate` for a built plan (configs/rates.yaml unless `rates_path`)."""
    from pipeline.config.rates import Rates
    from pipeline.config_files import REPO_CONFIG_DIR, load_model
    from pipeline.cost_model import estimate

    rates = load_model(rates_path or REPO_CONFIG_DIR / "rates.yaml", Rates)
    return estimate(run, rates, with_operators), rates


def echo_run_plan(config, run, with_operators: bool = True, estimated=None) -> list:
    """The plan table of a built plan (with estimate rows, their costs and sources); its steps."""
    from pipeline.plan_table import plan

    steps = plan(run.cfg, config, with_operators, run)
    echo_plan(steps, estimated[0] if estimated else None)
    if estimated:
        echo_estimate_sources(*estimated)
    return steps


def echo_plan(steps, rows=None) -> None:
    """The plan table; with estimate rows, each step's GPU hours, what bounds them, and its disk."""
    import pandas as pd

    table = pd.DataFrame([vars(s) for s in steps])
    if rows is not None:
        by_path = {r.path: r for r in rows if r.path}
        by_name = {(r.stage, r.encoder, r.what): r for r in rows if not r.path}
        found = [by_path.get(s.path) or by_name.get((s.stage, s.encoder, s.what)) for s in steps]
        table["GPU h"] = [r.gpu_hours if r else None for r in found]
        table["bound"] = [r.bound if r else "" for r in found]
        table["disk GB"] = [r.disk_gb if r else None for r in found]
    table = table.rename(columns={"what": "split / transform / pair"})
    typer.echo(table.to_markdown(index=False, tablefmt="simple", floatfmt=".3g"))
    if rows is not None:  # the totals below price every artifact; what is cached costs nothing now
        left = table[table["state"] != "cached"]
        typer.echo(f"\nstill to run (cached artifacts left out): "
                   f"{left['GPU h'].sum():.4g} GPU h, {left['disk GB'].sum():.4g} GB of "
                   f"{table['GPU h'].sum():.4g} GPU h, {table['disk GB'].sum():.4g} GB in all")  # fmt: skip


def echo_estimate(rows, rates) -> None:
    """The estimate alone (a config whose dataset is not here: `--images`), then its totals and sources."""
    import pandas as pd

    table = pd.DataFrame(
        [{"stage": r.stage, "encoder": r.encoder, "what": r.what, "images": r.images, "GPU h": r.gpu_hours,
          "compute h": r.compute_hours, "host h": r.host_hours, "host ms/image": r.host_ms, "bound": r.bound,
          "disk GB": r.disk_gb} for r in rows]
    )  # fmt: skip
    typer.echo(table.to_markdown(index=False, tablefmt="simple", floatfmt=".3g"))
    echo_estimate_sources(rows, rates)


def echo_estimate_sources(rows, rates) -> None:
    """Totals per stage and where every figure comes from."""
    import pandas as pd

    table = pd.DataFrame([{"stage": r.stage, "compute h": r.compute_hours, "host h": r.host_hours,
                           "GPU h": r.gpu_hours, "disk GB": r.disk_gb} for r in rows])  # fmt: skip
    totals = table.groupby("stage", sort=False).sum(min_count=1)
    totals.loc["total"] = totals.sum()
    typer.echo(f"\nEstimate on {rates.gpu.name}, per stage:\n")
    typer.echo(totals.reset_index().to_markdown(index=False, tablefmt="simple", floatfmt=".4g"))
    typer.echo("\nGPU h: hours a stage holds one GPU = max(compute h: its FLOPs on the GPU, host h: the CPU work "
               "feeding it).")  # fmt: skip
    for stage, basis in dict.fromkeys((r.stage, r.basis) for r in rows):
        typer.echo(f"  {stage}: {basis}")
    typer.echo(f"  GPU utilisation: {rates.gpu.utilisation_source}")
    for stage, points in rates.gpu.utilisation_by_step_tflop.items():
        shares = ", ".join(f"{tflop:g} TFLOP -> {share:g}" for tflop, share in sorted(points.items()))
        typer.echo(f"  GPU utilisation by step, {stage}: {shares} (log-linear between, the end's beyond)")
    typer.echo(f"  host: {rates.host.source}; {rates.host.cpu_cores} cores: {rates.host.cpu_cores_source}")
    typer.echo(f"  bytes: {rates.stored_bytes.source}")
