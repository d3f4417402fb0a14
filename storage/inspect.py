"""Summaries of feature stores for `reconlab store ls` and `reconlab store inspect`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from storage.format import FORMAT_KEY, decoding, open_store
from storage.layout import StoreError


def disk_bytes(*paths: Path) -> int:
    """Bytes of the files under `paths`, each file once: stores of one encoder's layers hard-link the first
    one's pixel shards."""
    files = {(st.st_dev, st.st_ino): st.st_size
             for path in paths for p in Path(path).rglob("*") if p.is_file() and (st := p.stat())}  # fmt: skip
    return sum(files.values())


def codec_text(codec) -> str:
    """A codec as its spec name and settings, e.g. 'blosc(cname=zstd, clevel=3, shuffle=shuffle)'."""
    try:
        spec = codec.to_dict()
    except (AttributeError, NotImplementedError):
        return type(codec).__name__
    settings = {
        k: v
        for k, v in (spec.get("configuration") or {}).items()
        if k != "typesize" and not (k == "blocksize" and not v)  # blocksize 0: blosc's own choice
    }
    return f"{spec['name']}({', '.join(f'{k}={v}' for k, v in settings.items())})"


def transform_tag(image_transform: dict) -> str:
    """The transform's short name (`scale_channel-b-0.5`), also for stores made before it was recorded."""
    return image_transform.get("tag") or "-".join(str(v) for v in image_transform.values() if v is not None)


def find_stores(root: Path) -> list[Path]:
    """reconlab's stores under `root`, and folders named like one (`*.zarr`) whose zarr.json is not JSON or is
    gone (listed as errors)."""
    named = {p for p in Path(root).glob("*.zarr") if p.is_dir() and not (p / "zarr.json").exists()}
    found = {p.parent for p in Path(root).glob("*/zarr.json") if _is_store_json(p)} | named
    return sorted(p for p in found if not p.name.startswith("."))  # hidden: being created


def _is_store_json(path: Path) -> bool:
    text = path.read_text(errors="replace")
    if FORMAT_KEY in text[:100000]:
        return True
    if path.parent.suffix != ".zarr":
        return False
    try:
        json.loads(text)
    except ValueError:
        return True  # a store's record gone bad: listed, so that its error is seen
    return False


def summary_row(path: Path) -> dict:
    """One line's worth: encoder, dataset/split, N, grid, dtype, size, complete."""
    try:
        store = open_store(path, require_complete=False)
    except StoreError as e:
        return {"path": str(path), "error": str(e)}
    attrs, lay = store.attrs, store.layout
    return {
        "path": str(path),
        "encoder": attrs["encoder"]["name"],
        "dataset": f"{attrs['dataset']['name']}/{attrs['dataset']['split']}",
        "transform": transform_tag(attrs["image_transform"]),
        "n_images": lay.n_images,
        "n_failed": attrs.get("n_failed"),
        "grid": f"{lay.grid_hw[0]}x{lay.grid_hw[1]}x{lay.hidden_dim}",
        "dtype": lay.precision,
        "size_mb": disk_bytes(path) / 1e6,
        "status": status_text(store),
    }


def status_text(store) -> str:
    """complete, partial k/n shards, or damaged (files changed since written; a `stat` per file, no hashing)."""
    done = store.shard_done()
    if damaged := store.damaged_shards():
        return f"DAMAGED: {len(damaged)} shard(s) changed on disk, e.g. shard {next(iter(damaged))}; re-run encode"
    return "complete" if store.complete else f"partial {int(done.sum())}/{done.size} shards"


def inspect_store(path: Path, n_stat_images: int = 64) -> dict:
    """Everything about one store: arrays, codecs, compression, completeness, provenance, failures, statistics."""
    store = open_store(path, require_complete=False)
    attrs, group = store.attrs, store.group
    arrays = {}
    for name in sorted(group.array_keys()):
        arr = group[name]
        raw = arr.nbytes
        on_disk = disk_bytes(Path(path) / name)
        arrays[name] = {
            "shape": list(arr.shape),
            "dtype": str(arr.dtype),
            "chunks": list(arr.chunks),
            "shards": list(arr.shards) if arr.shards else None,
            "filters": [codec_text(c) for c in arr.filters],
            "compressors": [codec_text(c) for c in arr.compressors],
            "bytes_raw": int(raw),
            "bytes_on_disk": int(on_disk),
            "compression_ratio": raw / on_disk if on_disk else None,
        }
    damaged = store.damaged_shards()
    k = store.layout.shard_images
    try:  # statistics of a sample of intact shards; a damaged store is still described, not refused
        valid_rows = np.array([r for r in np.flatnonzero(store.valid()) if r // k not in damaged], int)
        stats = _sampled_stats(store, valid_rows[:n_stat_images])
    except StoreError as e:
        stats = {"unreadable": str(e)}
    except OSError as e:  # a shard file the OS will not let us read (permissions, I/O error)
        stats = {"unreadable": f"{e.filename}: {e.strerror}"}
    done = store.shard_done()
    # a store still being written: what its done shards' records say so far
    records = [
        r for key, r in sorted(store.shard_records().items(), key=lambda kv: int(kv[0])) if done[int(key)]
    ]
    failures = attrs["failures"] if "failures" in attrs else [f for r in records for f in r["failures"]]
    return {
        "path": str(path),
        "format_version": attrs.get(FORMAT_KEY),
        "config_hash": attrs["config_hash"],
        "config": attrs.get("config"),
        "content_sha256": attrs.get("content_sha256"),  # the identity later stages key on (when complete)
        "precision": store.layout.precision,
        "layout": attrs["layout"],
        "complete": store.complete,
        "status": status_text(store),
        "damaged_shards": {str(k): v for k, v in damaged.items()},
        "shards_done": f"{int(done.sum())}/{done.size}",
        "n_images": store.n_images,
        "n_encoded": attrs.get("n_encoded", sum(r["n_encoded"] for r in records)),
        "n_failed": attrs.get("n_failed", len(failures)),
        "failures": failures,
        "arrays": arrays,
        "bytes_on_disk": disk_bytes(path),
        "encoder": attrs["encoder"],
        "dataset": attrs["dataset"],
        "dataset_source": attrs.get("dataset_source"),
        "image_transform": attrs["image_transform"],
        "decoding": decoding(attrs.get("config", {})),
        "provenance": attrs["provenance"],
        "feature_stats_recorded": attrs.get("feature_stats"),
        "feature_stats_sampled": stats,
    }


def _sampled_stats(store, rows: np.ndarray) -> dict:
    if not rows.size:
        return {}
    feats = store.features(rows)
    norms = np.linalg.norm(feats, axis=-1)
    return {
        "n_images_sampled": int(rows.size),
        "mean_token_norm": float(np.nanmean(norms)),
        "fraction_nonfinite": float((~np.isfinite(feats)).mean()),
        "mean": float(np.nanmean(feats)),
        "std": float(np.nanstd(feats)),
    }


def write_preview(path: Path, out_png: Path, n_images: int = 6) -> Path:
    """A figure: stored images beside the first 3 PCA components of their features (as RGB)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store = open_store(path, require_complete=False)
    rows = np.flatnonzero(store.valid())[:n_images]
    if rows.size == 0:
        raise StoreError(f"{path}: no encoded images to preview")
    feats = store.features(rows)
    n, h, w, d = feats.shape
    flat = feats.reshape(-1, d).astype(np.float64)
    flat -= flat.mean(axis=0)
    # PCA over all tokens of the shown images; scipy/numpy SVD, components scaled to [0, 1] for display.
    _, _, vt = np.linalg.svd(flat, full_matrices=False)
    comps = flat @ vt[:3].T
    lo, hi = np.percentile(comps, 1, axis=0), np.percentile(comps, 99, axis=0)
    rgb = np.clip((comps - lo) / np.maximum(hi - lo, 1e-12), 0, 1).reshape(n, h, w, 3)
    has_pixels = "pixels" in store.group
    fig, axes = plt.subplots(
        2 if has_pixels else 1, n, figsize=(2 * n, 4 if has_pixels else 2), squeeze=False
    )
    for i, row in enumerate(rows):
        if has_pixels:
            axes[0, i].imshow(store.pixels(int(row)))
            axes[0, i].set_title(f"id {int(store.image_ids()[row])}", fontsize=8)
        axes[-1, i].imshow(rgb[i], interpolation="nearest")
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(f"{store.attrs['encoder']['name']}: images and feature PCA (first 3 components)", fontsize=9)
    out_png = Path(out_png)
    if out_png.is_dir():  # a folder: the figure goes inside, named after the store
        out_png = out_png / f"{Path(path).name}.preview.png"
    elif out_png.suffix.lower().lstrip(".") not in fig.canvas.get_supported_filetypes():
        out_png = out_png.with_name(out_png.name + ".png")  # what matplotlib would write: say that name
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return out_png
