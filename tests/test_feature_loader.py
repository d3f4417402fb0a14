"""The train loader (pipeline/data/feature_loader.py): every valid image once per epoch, features and pixels of
the same image together, seeded order, and reads into reused buffers."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.feature_loader import EpochBatches, batch_stream, widen
from storage import StoreError, StoreLayout, create, open_store
from storage.precision import resolve_codecs, value_stats


@pytest.fixture
def labelled_store(tmp_path):
    """150 images in shards of 16 (the last one short), ~10 % invalid; image i's features and pixels hold i."""
    n, rng = 150, np.random.default_rng(0)
    layout = StoreLayout(n_images=n, grid_hw=(2, 2), hidden_dim=4, pixel_size=4, shard_images=16,
                         precision="float16", **resolve_codecs("float16", "auto", None))  # fmt: skip
    store = create(tmp_path / "s.zarr", layout, {})
    rows = np.arange(n)
    features = np.broadcast_to(rows[:, None, None, None], (n, 2, 2, 4)).astype(np.float32)
    pixels = np.broadcast_to((rows % 256)[:, None, None, None], (n, 4, 4, 3)).astype(np.uint8)
    valid = rng.random(n) > 0.1
    for shard in range(layout.n_shards):
        r = layout.shard_slice(shard)
        store.write_shard(shard, features[r], pixels[r], rows[r], valid[r], {"n_encoded": 0, "failures": [],
                                                                           "stats": value_stats(features[r])})  # fmt: skip
    store.finalize()
    return open_store(store.path), valid


@pytest.mark.parametrize("workers", [1, 0])
def test_the_train_stages_epochs_are_batch_streams_from_a_worker_process_or_a_thread(labelled_store, workers):
    store, _ = labelled_store
    epochs = EpochBatches(store, 7, seed=1, epochs=range(2, 5), buffer_images=20, depth=2, pin=False,
                          workers=workers)  # fmt: skip
    for epoch in range(2, 5):
        got = [(f.numpy(), p.numpy()) for f, p in epochs.of(epoch)]
        expected = list(batch_stream(store, 7, 1, epoch, 20))
        assert len(got) == len(expected) > 0
        for (f, p), (f_expected, p_expected) in zip(got, expected, strict=True):
            np.testing.assert_array_equal(f, f_expected)
            np.testing.assert_array_equal(p, p_expected)
    assert list(epochs.of(5)) == []  # past the last epoch: nothing, no hang
    epochs.close()


def test_where_dev_shm_is_too_small_the_loader_reads_on_a_thread_with_the_same_batches(
    labelled_store, monkeypatch
):
    from collections import namedtuple

    from pipeline.data import feature_loader

    store, _ = labelled_store
    usage = namedtuple("usage", "total used free")
    on_linux = sys.platform.startswith("linux")
    assert feature_loader.reads_in_a_worker(store, 7, 2, on_gpu=True) == on_linux
    assert not feature_loader.reads_in_a_worker(
        store, 7, 2, on_gpu=False
    )  # the CPU trains faster beside a thread
    monkeypatch.setattr(feature_loader.shutil, "disk_usage", lambda path: usage(64 << 20, 64 << 20, 1024))
    assert not feature_loader.reads_in_a_worker(store, 7, 2, on_gpu=True)
    epochs = EpochBatches(store, 7, seed=1, epochs=range(1), buffer_images=20, depth=2, pin=False)
    assert not epochs.in_worker
    assert [f.numpy().tolist() for f, _ in epochs.of(0)] == [
        f.tolist() for f, _ in batch_stream(store, 7, 1, 0, 20)
    ]
    monkeypatch.undo()
    assert feature_loader.shared_memory_fits(store, 7, 2) == on_linux


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_closed_epoch_loader_ends_its_worker_process(labelled_store):
    store, _ = labelled_store
    epochs = EpochBatches(
        store, 7, seed=1, epochs=range(100), buffer_images=20, depth=2, pin=False, workers=1
    )
    next(epochs.of(0))  # an epoch left unfinished, as a stopped training leaves it
    assert _fork_server_children()
    epochs.close()
    deadline = time.time() + 10
    while _fork_server_children() and time.time() < deadline:
        time.sleep(0.1)
    assert not _fork_server_children()


def test_a_read_error_in_the_worker_is_raised_in_the_training_process_as_itself_with_its_traceback(
    labelled_store,
):
    store, _ = labelled_store
    chunks = sorted(p for p in (store.path / "features").rglob("*") if p.is_file() and p.name[0].isdigit())
    for chunk in chunks:
        chunk.write_bytes(b"not a chunk" * 8)
    epochs = EpochBatches(store, 7, seed=1, epochs=range(1), buffer_images=20, depth=2, pin=False, workers=1)
    # raised as itself, so the CLI shows a damaged store in one line; the worker's traceback is its cause
    with pytest.raises(StoreError, match="changed on disk since they were written") as raised:
        list(epochs.of(0))
    assert "the train loader's worker process failed:\nTraceback" in str(raised.value.__cause__)
    epochs.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_killed_worker_is_an_error_in_the_training_process_not_a_hang(labelled_store):
    import signal

    store, _ = labelled_store
    epochs = EpochBatches(
        store, 7, seed=1, epochs=range(100), buffer_images=20, depth=2, pin=False, workers=1
    )
    batches = epochs.of(0)
    next(batches)
    (worker,) = _fork_server_children()
    os.kill(worker, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"worker process ended \(exit code -9\) before its last batch"):
        for _ in range(1000):
            next(batches)
    epochs.close()


def _fork_server_children() -> list[int]:
    """Workers: children of this process's children (the fork server's), none of its own."""
    from flows.reaper import processes

    table = processes()
    mine = {pid for pid, (parent, _) in table.items() if parent == os.getpid()}
    return [pid for pid, (parent, _) in table.items() if parent in mine]


def _ids(batches) -> list[int]:
    return [int(i) for features, _ in batches for i in features[:, 0, 0, 0]]


def test_every_valid_image_comes_once_per_epoch_with_its_own_pixels(labelled_store):
    store, valid = labelled_store
    batches = list(batch_stream(store, batch_size=7, seed=1, epoch=0, buffer_images=20))
    assert sorted(_ids(batches)) == np.flatnonzero(valid).tolist()
    assert all(len(f) == 7 for f, _ in batches[:-1])
    for features, pixels in batches:
        assert features.dtype == np.float16  # as stored, converted on the device
        np.testing.assert_array_equal(pixels[:, 0, 0, 0], features[:, 0, 0, 0].astype(int) % 256)


def test_the_order_is_seeded_per_epoch_and_pixels_false_gives_the_same_features(labelled_store):
    store, _ = labelled_store
    first = _ids(batch_stream(store, 8, seed=3, epoch=2, buffer_images=32))
    assert first == _ids(batch_stream(store, 8, seed=3, epoch=2, buffer_images=32, pixels=False))
    assert first != _ids(batch_stream(store, 8, seed=3, epoch=3, buffer_images=32))
    assert all(p is None for _, p in batch_stream(store, 8, seed=3, epoch=2, buffer_images=32, pixels=False))


def test_reads_into_a_given_buffer_and_refuses_one_of_the_wrong_shape(labelled_store):
    store, _ = labelled_store
    rows = np.array([3, 40, 17])
    buffer = np.empty((3, 2, 2, 4), np.float16)
    assert store.features(rows, as_stored=True, out=buffer) is buffer
    np.testing.assert_array_equal(buffer[:, 0, 0, 0], rows)
    with pytest.raises(ValueError, match="C-contiguous float16 array of shape"):
        store.features(rows, as_stored=True, out=np.empty((2, 2, 2, 4), np.float16))


def test_int8_stores_dequantise_into_the_given_buffer_as_a_plain_read_does(tmp_path):
    n, rng = 20, np.random.default_rng(1)
    layout = StoreLayout(n_images=n, grid_hw=(2, 3), hidden_dim=8, pixel_size=4, shard_images=8,
                         precision="int8_per_token", **resolve_codecs("int8_per_token", "auto", None))  # fmt: skip
    store = create(tmp_path / "q.zarr", layout, {})
    features = rng.standard_normal((n, 2, 3, 8)).astype(np.float32)
    for shard in range(layout.n_shards):
        r = layout.shard_slice(shard)
        store.write_shard(shard, features[r], np.zeros((r.stop - r.start, 4, 4, 3), np.uint8), np.arange(n)[r],
                          np.ones(r.stop - r.start, bool), {"n_encoded": 0, "failures": [], "stats": {}})  # fmt: skip
    store = open_store(store.path, require_complete=False)
    rows = np.array([2, 9, 17])
    buffer = np.full((3, 2, 3, 8), np.nan, np.float32)
    assert store.features(rows, as_stored=True, out=buffer) is buffer
    np.testing.assert_array_equal(buffer, store.features(rows))
    with pytest.raises(ValueError, match="float32 array of shape"):
        store.features(rows, as_stored=True, out=np.empty((3, 2, 3, 8), np.float16))
    np.testing.assert_allclose(buffer, features[rows], atol=np.abs(features[rows]).max() / 254 + 1e-7)
    batches = [torch.as_tensor(f) for f, _ in batch_stream(store, 4, seed=0, epoch=0, buffer_images=4)]
    # codes, then the scale's bytes
    assert all(f.dtype == torch.int8 and f.shape[-1] == 8 + 4 for f in batches)
    loaded = torch.cat([widen(f) for f in batches]).numpy()
    order = np.argsort(loaded[:, 0, 0, 0])  # batches are shuffled: match images by a value
    stored = store.features()
    np.testing.assert_array_equal(loaded[order], stored[np.argsort(stored[:, 0, 0, 0])])


def test_bf16_stores_travel_as_bf16_and_widen_to_the_stored_values(tmp_path):
    n, rng = 20, np.random.default_rng(2)
    layout = StoreLayout(n_images=n, grid_hw=(2, 2), hidden_dim=8, pixel_size=4, shard_images=8,
                         precision="bf16_bitround", **resolve_codecs("bf16_bitround", "auto", None))  # fmt: skip
    store = create(tmp_path / "b.zarr", layout, {})
    features = (rng.standard_normal((n, 2, 2, 8)) * 1e3).astype(np.float32)
    features[0, 0, 0, :4] = [np.inf, -np.inf, np.nan, 3.4e38]
    for shard in range(layout.n_shards):
        r = layout.shard_slice(shard)
        store.write_shard(shard, features[r], np.zeros((r.stop - r.start, 4, 4, 3), np.uint8), np.arange(n)[r],
                          np.ones(r.stop - r.start, bool), {"n_encoded": 0, "failures": [], "stats": {}})  # fmt: skip
    store = open_store(store.path, require_complete=False)
    batches = [f for f, _ in batch_stream(store, 6, seed=0, epoch=0, buffer_images=4)]
    assert all(f.dtype == torch.bfloat16 for f in batches)
    widened = torch.cat([widen(f) for f in batches]).numpy()
    stored = store.features()
    assert widened.shape == stored.shape
    order = np.argsort(widened.reshape(n, -1)[:, 5])  # batches are shuffled: match images by a finite value
    np.testing.assert_array_equal(widened[order], stored[np.argsort(stored.reshape(n, -1)[:, 5])])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_the_fork_server_starts_deaf_to_ctrl_c_and_the_caller_keeps_its_signal_mask():
    # A terminal's Ctrl-C reaches the whole process group; the fork server ignores it only after its imports
    # (seconds): interrupted during them it died with a traceback and the stage waited ~15 s on it.
    import multiprocessing.forkserver
    import signal
    from pathlib import Path

    from pipeline.data import worker_processes

    worker_processes.context()
    pid = multiprocessing.forkserver._forkserver._forkserver_pid
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    blocked = int(next(line for line in status if line.startswith("SigBlk:")).split()[1], 16)
    assert blocked & (1 << (signal.SIGINT - 1))
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


_HOLDS_A_WORKER = """
import sys, time
from pipeline.data.feature_loader import EpochBatches
from storage import open_store
epochs = EpochBatches(open_store(sys.argv[1]), 7, seed=1, epochs=range(100), buffer_images=20, depth=2, pin=False,
                      workers=1)
next(epochs.of(0))
print("reading", flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_sigkilled_training_process_leaves_no_loader_worker_running(
    labelled_store, tmp_path, processes_with
):
    """A GPU's training reads in a worker process: a kill of the training process (OOM killer, scheduler) must
    not leave it, or its fork server, running."""
    import signal
    import subprocess

    store, _ = labelled_store
    tag = f"RECONLAB_TEST_LOADER={tmp_path.name}"  # inherited by every process the training process starts
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), **dict([tag.split("=")])}
    proc = subprocess.Popen([sys.executable, "-c", _HOLDS_A_WORKER, str(store.path)], env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "reading"
    assert len(processes_with(tag)) >= 2  # the training process and its loader's worker (and fork server)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and processes_with(tag):
        time.sleep(0.2)
    assert not processes_with(tag)
