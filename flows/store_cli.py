"""`reconlab store ...` (list, inspect and verify cached feature stores) and `reconlab ls` (every artifact)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.errors import OneValueEach, reported_in_one_line
from flows.errors import fail as _fail

store_app = typer.Typer(cls=OneValueEach, no_args_is_help=True, help="Inspect cached feature stores.")


@store_app.command("ls")
def ls(
    root: Annotated[Path, typer.Argument(help="Store root folder, or one store.")] = Path("runs/demo/stores"),
) -> None:
    """One line per store: encoder, dataset/split, transform, N, failures, grid, precision, size on disk, status,
    and the key that tells stores of one encoder apart (the hash ending the store's folder name)."""
    from storage.inspect import find_stores, summary_row

    if not root.is_dir():
        _fail(f"{root}: no such folder" if not root.exists() else f"{root}: not a folder of stores (a file)")
    stores = [root] if (root / "zarr.json").is_file() else find_stores(root)
    rows = [summary_row(p) for p in stores]
    if not rows:
        typer.echo(f"no feature stores under {root}")
        return
    readable = [r for r in rows if "error" not in r]
    table = [
        {
            "encoder": r["encoder"], "dataset/split": r["dataset"], "transform": r["transform"], "N": r["n_images"],
            "fail": "-" if r["n_failed"] is None else r["n_failed"], "grid": r["grid"], "precision": r["dtype"],
            "size": f"{r['size_mb']:.1f}MB", "status": r["status"], "key": Path(r["path"]).resolve().stem.rpartition("__")[2],
        }
        for r in readable
    ]  # fmt: skip
    if table:
        from tabulate import tabulate

        right = {"N", "fail", "size"}  # keys stay text: a hash like 1234e567... is no number
        aligned = tuple("right" if name in right else "left" for name in table[0])
        typer.echo(tabulate(table, headers="keys", tablefmt="plain", colalign=aligned, disable_numparse=True))
        if len(table) > 1:
            from storage.inspect import disk_bytes

            typer.echo(f"{len(table)} stores, {disk_bytes(*(r['path'] for r in readable)) / 1e6:.1f}MB on disk "
                       "(a file hard-linked into several stores counted once)")  # fmt: skip
    for r in [r for r in rows if r not in readable]:
        typer.echo(r["error"] if r["error"].startswith(r["path"]) else f"{r['path']}: {r['error']}")


@store_app.command("inspect")
def inspect(
    path: Annotated[Path, typer.Argument(help="A store folder (*.zarr).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the full record as JSON.")] = False,
    preview: Annotated[
        Path | None, typer.Option(help="Write a PNG: images beside their feature PCA.")
    ] = None,
) -> None:
    """Shape, dtype, chunking, codecs, compression, completeness, provenance, failures, feature statistics."""
    from storage import StoreError
    from storage.inspect import inspect_store, transform_tag, write_preview

    try:
        info = inspect_store(path)
        if preview is not None:
            preview = write_preview(path, preview)
    except StoreError as e:
        _fail(str(e))
    if as_json:
        json.dump(info, sys.stdout, indent=2, default=str)
        typer.echo("")
    else:
        enc, prov = info["encoder"], info["provenance"]
        typer.echo(f"store      {info['path']}")
        typer.echo(
            f"format     v{info['format_version']}  config {info['config_hash']}  precision {info['precision']}"
        )
        typer.echo(f"status     {info['status']} ({info['shards_done']} shards done)")
        for shard, problem in info["damaged_shards"].items():
            typer.echo(f"damaged    shard {shard}: {problem}")
        so_far = "" if info["complete"] else " so far"
        typer.echo(
            f"images     {info['n_encoded']} encoded, {info['n_failed']} failed{so_far} of {info['n_images']}"
        )
        typer.echo(
            f"encoder    {enc['name']} ({enc['backend']} {enc['model_id']}, layer {enc['feature_layer']}, "
            f"{enc['n_prefix_tokens_dropped']} prefix tokens dropped, weights {enc['weights_id']})"
        )
        typer.echo(
            f"dataset    {info['dataset']['name']}/{info['dataset']['split']}  transform {transform_tag(info['image_transform'])}  "
            f"geometry {enc['preprocessing'].get('geometry', 'native')}  resize {info['decoding']['resize']}  "
            f"jpeg_draft {info['decoding']['jpeg_draft']}"
        )
        for name, a in info["arrays"].items():
            ratio = f"{a['compression_ratio']:.2f}x" if a["compression_ratio"] else "-"
            typer.echo(
                f"  {name:<15} {str(a['shape']):<22} {a['dtype']:<8} chunks {a['chunks']} shards {a['shards']} "
                f"codecs {' + '.join(a['filters'] + a['compressors']) or 'none'} ratio {ratio} "
                f"({a['bytes_on_disk'] / 1e6:.2f} MB)"
            )
        s = info["feature_stats_sampled"]
        if "unreadable" in s:
            typer.echo(f"features   not sampled: {s['unreadable']}")
        elif s:
            typer.echo(
                f"features   mean token norm {s['mean_token_norm']:.3f}, non-finite {s['fraction_nonfinite']:.2e} "
                f"(over {s['n_images_sampled']} images)"
            )
        typer.echo(f"recorded   {info['feature_stats_recorded']}")
        typer.echo(
            f"made by    reconlab {prov['reconlab_version']} @ {prov['git_commit'][:12]} on {prov['created_utc']}"
        )
        versions = prov.get("package_versions") or {}
        typer.echo(
            "packages   " + (", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "not recorded")
        )
        for f in info["failures"][:20]:
            typer.echo(f"  failed   id {f['image_id']}: {f['reason']}  ({f['path']})")
    if preview is not None:
        typer.echo(f"preview written to {preview}")


@store_app.command("verify")
def verify_store(
    path: Annotated[Path, typer.Argument(help="A store folder (*.zarr).")],
    recompute: Annotated[
        int, typer.Option("--recompute", min=1, help="Re-encode this many random images.")
    ] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the image choice.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Take back the shards whose files fail their SHA-256, for `reconlab encode` to redo.",
        ),
    ] = False,
) -> None:
    """Check every shard file against the SHA-256 recorded when it was written, then re-encode N random images
    with the store's recorded encoder, weights, layer and geometry and compare them with the stored features
    (within the precision's error bound). Exit 1 on a mismatch."""
    from pipeline.stages.verify import repair as take_back
    from pipeline.stages.verify import verify

    if repair:
        with reported_in_one_line():
            damaged = take_back(path)
        for shard, problem in damaged.items():
            typer.echo(f"took back shard {shard}: {problem}")
        if damaged:
            typer.echo(f"{path}: {len(damaged)} shard(s) taken back; run `reconlab encode` with the same config: "
                       "it re-encodes exactly those shards")  # fmt: skip
            return
    with reported_in_one_line():
        report = verify(path, recompute, seed, device)
    for note in report.notes:
        typer.echo(f"note: {note}")
    worst = max(report.checks, key=lambda c: c.feature_error)
    summary = (f"{len(report.checks)} images re-encoded; largest token-relative feature error "
               f"{worst.feature_error:.3g} (image {worst.image_id}), bound {report.bound:.3g}")  # fmt: skip
    if not report.mismatches:
        typer.echo(f"OK: {summary}")
        return
    typer.secho(f"MISMATCH: {len(report.mismatches)} of {summary}", fg=typer.colors.RED, err=True)
    for c in report.mismatches:
        pixels = "" if c.pixel_max_abs_diff < 0 else f", stored pixels differ by up to {c.pixel_max_abs_diff}"
        typer.echo(f"  image {c.image_id} ({c.path}): feature error {c.feature_error:.3g}{pixels}", err=True)
    raise typer.Exit(1)


def ls_artifacts(
    root: Annotated[
        Path, typer.Argument(help="Folder to scan (e.g. runs/ or a config's output roots).")
    ] = Path("runs"),
) -> None:
    """Every artifact under ROOT: feature stores, training runs, operator fits, score sets, reports — with status,
    size on disk and age."""
    import pandas as pd

    from pipeline.artifacts import list_artifacts

    if not root.is_dir():
        _fail(
            f"{root}: no such folder" if not root.exists() else f"{root}: a file, not a folder of artifacts"
        )
    rows = list_artifacts(root)
    if not rows:
        typer.echo(f"no reconlab artifacts under {root}")
        return
    table = pd.DataFrame(rows)[["kind", "status", "size_mb", "age", "path"]]
    typer.echo(table.to_markdown(index=False, tablefmt="simple", floatfmt=".1f"))
