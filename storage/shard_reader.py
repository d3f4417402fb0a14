"""Rows of a store's per-image arrays read straight from their shard files.

zarr-python reads the shard index and decodes through its async machinery on every call: ~2.5 ms for one image
of ViT-B features, where the bytes take ~0.5 ms (docs/benchmarks.md). The layout is the Zarr v3 spec's
`sharding_indexed` (storage/README.md): at the end of each shard file, one (offset, nbytes) pair of little-endian
uint64 per inner chunk, then a CRC32C; each inner chunk (one image) is the `bytes` codec's little-endian array,
compressed. This reader keeps each shard's index after its first read (checked against its CRC32C), reads only
the chunks asked for, and decodes them with the same codec from numcodecs. Arrays with any other chain are
read by zarr.
"""

from __future__ import annotations

import os
import queue
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation

_EMPTY = np.uint64(2**64 - 1)  # offset and nbytes of a chunk never written (fill value)
_MIN_ROWS_PER_TASK = 4  # rows one thread reads in turn: enough to outweigh a task's start
_MAX_THREADS = 8


class ShardReader:
    def __init__(self, array: zarr.Array, folder: Path):
        self.folder = folder
        meta = array.metadata
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.fill_value = meta.fill_value
        self.shape = array.shape
        self.shard_rows = meta.chunk_grid.chunk_shape[0]
        self.decoder = _decoder(meta.codecs)
        self.chunk_key = meta.encode_chunk_key
        self._indexes: dict[int, np.ndarray] = {}
        self._spare_buffers: queue.SimpleQueue[bytearray] = queue.SimpleQueue()

    @classmethod
    def of(cls, array: zarr.Array, folder: Path) -> ShardReader | None:
        """A reader when the array's chain is one this reader decodes exactly, else None."""
        codecs = array.metadata.codecs
        if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
            return None
        sharding = codecs[0]
        if sharding.chunk_shape[0] != 1 or tuple(sharding.chunk_shape[1:]) != tuple(array.shape[1:]):
            return None
        index_ok = sharding.index_location == ShardingCodecIndexLocation.end and [
            type(c) for c in sharding.index_codecs
        ] == [BytesCodec, Crc32cCodec]
        if not index_ok or _decoder(codecs) is False:
            return None
        return cls(array, folder)

    def read(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The rows (any order, repeats allowed) as one array [len(rows), ...]. Many rows are read and decoded
        on parallel threads, the rows split evenly over up to 8 of them (reads and blosc/zstd decoding release the
        GIL): a whole shard of zstd-compressed features decodes on every core, not one. `out`: where to put
        them (a buffer reused across calls spares a fresh allocation's page faults)."""
        shape = (len(rows), *self.shape[1:])
        if out is None:
            out = np.empty(shape, self.dtype)
        elif out.shape != shape or out.dtype != self.dtype or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous {self.dtype} array of shape {shape}")
        shard_of = rows // self.shard_rows
        threads = min(os.cpu_count() or 1, _MAX_THREADS)
        # a shard's rows split over every thread (a loader reads one shard at a time), in runs of at least 4
        per_task = max(_MIN_ROWS_PER_TASK, -(-len(rows) // threads))
        tasks = []
        for shard in np.unique(shard_of):
            positions = np.flatnonzero(shard_of == shard)
            tasks += [
                (int(shard), part) for part in np.array_split(positions, -(-positions.size // per_task))
            ]
        workers = min(len(tasks), threads)
        if workers <= 1:
            for shard, positions in tasks:
                self._read_shard(shard, rows, positions, out)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(lambda task: self._read_shard(task[0], rows, task[1], out), tasks))
        return out.astype(self.dtype.newbyteorder("="), copy=False)

    def forget(self, shard: int) -> None:
        """Drop a cached index (the shard is being written again)."""
        self._indexes.pop(shard, None)

    def _read_shard(self, shard: int, rows: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
        """out[positions] = rows[positions], all of them rows of `shard`."""
        path = self.folder / self.chunk_key((shard,) + (0,) * (len(self.shape) - 1))
        if not path.is_file():  # no chunk of this shard was ever written
            out[positions] = self.fill_value
            return
        buffer = self._buffer()
        try:
            with open(path, "rb") as f:
                index = self._index(shard, f)
                for position in positions:
                    offset, nbytes = (int(v) for v in index[int(rows[position]) % self.shard_rows])
                    if offset == _EMPTY:
                        out[position] = self.fill_value
                        continue
                    if len(buffer) < nbytes:
                        buffer = bytearray(nbytes)
                    raw = memoryview(buffer)[:nbytes]
                    if os.preadv(f.fileno(), [raw], offset) != nbytes:
                        raise OSError(f"{path}: chunk of row {rows[position]} is cut short")
                    if self.decoder is None:
                        out[position] = np.frombuffer(raw, self.dtype).reshape(self.shape[1:])
                    else:  # straight into the output row: no intermediate array
                        self.decoder.decode(raw, out=out[position])
        finally:
            self._spare_buffers.put(buffer)

    def _buffer(self) -> bytearray:
        """A read buffer reused across calls: a fresh megabyte-sized allocation costs its page faults on every
        read (~0.3 ms for one 512 px image of float16 ViT-B features)."""
        try:
            return self._spare_buffers.get_nowait()
        except queue.Empty:
            return bytearray(0)

    def _index(self, shard: int, f) -> np.ndarray:
        if shard not in self._indexes:
            size = self.shard_rows * 16
            f.seek(-(size + 4), 2)
            raw = f.read(size + 4)
            if bytes(numcodecs.CRC32C().encode(raw[:size])[-4:]) != raw[size:]:
                raise OSError(f"{f.name}: shard index fails its CRC32C")
            self._indexes[shard] = np.frombuffer(raw[:size], "<u8").reshape(self.shard_rows, 2)
        return self._indexes[shard]


def _decoder(codecs):
    """The numcodecs decoder of the inner chain [bytes (little endian), compressor?]; None: no compressor;
    False: a chain this reader does not decode."""
    inner = list(codecs[0].codecs)
    if (
        not inner
        or not isinstance(inner[0], BytesCodec)
        or (inner[0].endian and inner[0].endian.value != "little")
    ):
        return False
    if len(inner) == 1:
        return None
    if len(inner) > 2:
        return False
    if isinstance(inner[1], BloscCodec):
        return numcodecs.Blosc()  # the blosc header says how the chunk was compressed
    if isinstance(inner[1], ZstdCodec):
        return numcodecs.Zstd()
    return False
