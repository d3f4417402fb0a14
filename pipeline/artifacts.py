"""What every stage's outputs share: an identity declared on the configs (fields marked RUNTIME never change a
result, every other field does), the folder an identity names, the result record that marks an artifact done
(schema version, key, provenance; written atomically, last), and the lock that keeps two runs off one artifact.

A stage's key is `identity(cfg)` plus whatever it resolved or read (device, dtype, input digests); its hash names
the artifact's folder. Adding a config field therefore changes keys unless the field is declared RUNTIME.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import to_jsonable_python

from pipeline import bars
from pipeline.config import config_hash
from pipeline.provenance import provenance
from storage import StoreLocked

RESULT = "result.json"  # an artifact's done marker and result record, written last
RECORD_SCHEMA_VERSION = 1


def is_runtime(model: type[BaseModel], name: str) -> bool:
    """Declared with pipeline.config.Runtime(...)."""
    extra = model.model_fields[name].json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("runtime"))


def identity(value: Any) -> Any:
    """A config as JSON with every RUNTIME field left out, recursively (nested models, lists, dicts)."""
    if isinstance(value, BaseModel):
        return {
            name: identity(getattr(value, name))
            for name in type(value).model_fields
            if not is_runtime(type(value), name)
        }
    if isinstance(value, list | tuple):
        return [identity(v) for v in value]
    if isinstance(value, dict):
        return {str(k): identity(v) for k, v in value.items()}
    return to_jsonable_python(value)


def folder(root: Path, label: str, key: dict, suffix: str = "") -> Path:
    """Where the artifact with this identity lives: `{root}/{label}__{hash of key}{suffix}`."""
    return Path(root) / f"{label}__{config_hash(key)}{suffix}"


def finish(record_path: Path, key: dict, record: dict) -> dict:
    """Mark an artifact done: its result record (schema version, key, hash, provenance), written atomically."""
    full = {"schema_version": RECORD_SCHEMA_VERSION, "config_hash": config_hash(key), "key": key, **record,
            "provenance": provenance()}  # fmt: skip
    write_json_atomic(record_path, full)
    return full


def finished(record_path: Path) -> dict | None:
    """The result record of a finished artifact; None while it is not done (missing, partial or unreadable)."""
    return read_json(record_path)


def write_json_atomic(path: Path, record: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename: a reader sees the old file or the new one,
    never a truncated one (a SIGKILL mid-write leaves only the temporary file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=to_jsonable_python))
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """A JSON record, or None when it is missing or unreadable (then the artifact counts as not finished)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


class WriteLock:
    """Exclusive lock on an artifact (store, training run, operator fit); released by the OS if the holder dies.
    By default a held lock fails at once; `wait_s` (or $RECONLAB_LOCK_WAIT_S, which the flows set from
    `orchestration.lock_wait_s`) waits that long for the other run, whose finished artifact is then re-used.
    Runs reading the artifact (ReadLock) hold it too: `--force` and `store verify --repair` refuse to remove or
    change what another run reads."""

    shared = False

    def __init__(self, artifact_path: Path, wait_s: float | None = None):
        # the real path: runs reaching one artifact through a symlink and by its own name share one lock
        real = Path(artifact_path).resolve()
        self.lock_path = real.with_name(real.name + ".lock")
        self.wait_s = float(os.environ.get("RECONLAB_LOCK_WAIT_S", 0)) if wait_s is None else wait_s
        self._fd: int | None = None

    def __enter__(self):
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline, announced = time.monotonic() + self.wait_s, False
        while True:
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holders = _holders(fd)
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreLocked(
                        f"{self.lock_path.with_suffix('')}: {holders} this artifact; "
                        "wait for it to finish or stop it, then re-run (finished work is kept)"
                    ) from None
                if not announced:
                    bars.notice(f"waiting: {holders} {self.lock_path.with_suffix('')}")
                    announced = True
                time.sleep(min(2.0, max(deadline - time.monotonic(), 0.05)))
        if not self.shared:  # readers leave the last writer's pid in place
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class ReadLock(WriteLock):
    """Shared lock on an artifact a stage reads: any number of runs read it at once; a run writing it makes the
    reader wait (or refuse) as WriteLock does."""

    shared = True


@contextlib.contextmanager
def reading(*artifact_paths: Path | None):
    """ReadLock on each artifact a stage reads while it runs (None, repeats and missing ones skipped: the stage
    says what is missing). An artifact whose lock file cannot be made (a read-only copy) is read unlocked: nothing
    here can remove it either."""
    with contextlib.ExitStack() as locks:
        for path in dict.fromkeys(Path(p) for p in artifact_paths if p is not None and Path(p).exists()):
            try:
                locks.enter_context(ReadLock(path))
            except PermissionError:
                continue
            except OSError as e:
                if e.errno != errno.EROFS:
                    raise
        yield


def _holders(fd: int) -> str:
    """Who holds the lock that `fd` could not take: a writer (its pid is in the file) or readers (shared holders
    only: a shared lock is then free; their pids from /proc/locks where there is one)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        return f"another run (pid {holder}) is writing"
    fcntl.flock(fd, fcntl.LOCK_UN)
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        lines = []
    pids = sorted({f[4] for f in map(str.split, lines) if len(f) > 5 and f[1] == "FLOCK" and f[5] == inode})
    return f"another run (pid {', '.join(pids)}) is reading" if pids else "another run is reading"


def list_artifacts(root: Path) -> list[dict]:
    """Every artifact under `root` — feature stores, training runs, operator fits, score sets, reports, token
    networks and studies, SAEs and their studies — with its status, size on disk and age, recognised by the files
    each kind always has."""
    from storage.inspect import summary_row

    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # hidden: stores being created
        kind, status = _kind_and_status(here, filenames)
        if kind is None:
            if here.name == "scores":  # score sets: a parquet and its meta record (written last) side by side
                for meta in sorted(here.glob("*.json")):
                    scores = meta.with_suffix(".parquet")
                    done = scores.is_file() and read_json(meta) is not None
                    found.append(_row("scores", scores, "complete" if done else "partial", [meta, scores]))
            continue
        if kind == "store":
            row = summary_row(here)
            status = row.get("status") or f"unreadable: {row.get('error')}"
        dirnames.clear()  # an artifact's insides are not artifacts
        found.append(_row(kind, here, status, [f for f in here.rglob("*") if f.is_file()]))
    return found


def _row(kind: str, path: Path, status: str, files: list[Path]) -> dict:
    import time

    stats = [f.stat() for f in files if f.is_file()]
    newest = max((st.st_mtime for st in stats), default=time.time())
    return {"kind": kind, "path": str(path), "status": status, "size_mb": sum(st.st_size for st in stats) / 1e6,
            "age": _age(time.time() - newest)}  # fmt: skip


def _kind_and_status(here: Path, filenames: list[str]) -> tuple[str | None, str]:
    finished = read_json(here / "result.json") is not None
    if "zarr.json" in filenames:
        return "store", ""
    if (here / "checkpoints").is_dir():
        kept = sorted((here / "checkpoints").glob("epoch-*.json"))  # the last `keep_last` only: count by name
        epochs = int(kept[-1].stem.removeprefix("epoch-")) + 1 if kept else 0
        if finished:
            from pipeline.stages.train import damaged  # the stage's own test; it imports this module

            why = damaged(read_json(here / "result.json"))
            return "training run", f"damaged ({why}; `reconlab train` trains it again)" if why else "complete"
        return "training run", f"partial ({epochs} epoch(s) done)"
    if "fits.md" in filenames or any(f.endswith("_eigenvalues.png") for f in filenames):
        return "operator fit", "complete" if finished else "partial"
    if "networks.json" in filenames:
        trained = len(list(here.glob("*/final.json")))
        return "token networks", "complete" if finished else f"partial ({trained} network(s) trained)"
    if "saes.json" in filenames:
        trained = len(list(here.glob("*/final.json")))
        return "SAEs", "complete" if finished else f"partial ({trained} SAE(s) trained)"
    if "pareto.csv" in filenames:
        return "SAE study", "complete" if finished else "partial"
    if "token_scores.parquet" in filenames:
        return "token study", "complete" if finished else "partial"
    if here.name.startswith("report__"):
        return "report", "complete" if "report.html" in filenames else "partial"
    fit_records = [f for f in filenames if f.endswith(".json") and _is_fit_record(here / f)]
    if fit_records:  # an operator fit killed before its first plot
        return "operator fit", "partial"
    return None, ""


def _is_fit_record(path: Path) -> bool:
    """An operator fit's per-fit record (`<fit>.json`, written before its plot and fits.md)."""
    record = read_json(path)
    return isinstance(record, dict) and {"fit", "transform", "direction", "source_store"} <= record.keys()


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"
