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
    typer.echo(f"\nreport: {result.report_md}\n        {result.report_html}")


def echo_estimate(config, image_counts: dict[str, int] | None, rates_path, with_operators: bool) -> None:
    """`reconlab plan --estimate`: GPU-hours and disk per planned artifact, totals per stage, and the source of
    every rate (configs/rates.yaml)."""
    import pandas as pd

    from pipeline import plan
    from pipeline.config.rates import Rates
    from pipeline.config_files import REPO_CONFIG_DIR, load_model, load_run_config
    from pipeline.cost_model import estimate

    rates_path = rates_path or REPO_CONFIG_DIR / "rates.yaml"
    rates = load_model(rates_path, Rates)
    run = plan.build(load_run_config(config), config, image_counts=image_counts)
    rows = estimate(run, rates, with_operators)
    table = pd.DataFrame(
        [{"stage": r.stage, "encoder": r.encoder, "what": r.what, "images": r.images, "GPU h": r.gpu_hours,
          "compute h": r.compute_hours, "host h": r.host_hours, "host ms/image": r.host_ms, "bound": r.bound,
          "disk GB": r.disk_gb}
         for r in rows]
    )  # fmt: skip
    typer.echo(f"\nEstimate ({rates.gpu.name}; rates: {rates_path})\n")
    typer.echo(table.to_markdown(index=False, tablefmt="simple", floatfmt=".3g"))
    totals = table.groupby("stage", sort=False)[["GPU h", "disk GB"]].sum(min_count=1)
    totals.loc["total"] = totals.sum()
    typer.echo("\n" + totals.reset_index().to_markdown(index=False, tablefmt="simple", floatfmt=".4g"))
    typer.echo(
        "\nGPU h: hours the stage holds one GPU = max(compute h, host h); host h: the CPU work beside it."
    )
    for stage, basis in dict.fromkeys((r.stage, r.basis) for r in rows):
        typer.echo(f"  {stage}: {basis}")
    typer.echo(f"  GPU utilisation: {rates.gpu.utilisation_source}")
    typer.echo(f"  host: {rates.host.source}; {rates.host.cpu_cores} cores: {rates.host.cpu_cores_source}")
    typer.echo(f"  bytes: {rates.stored_bytes.source}")
