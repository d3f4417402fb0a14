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
