"""Whole shard files of a store's per-image arrays, written straight to disk in the layout zarr reads.

zarr-python writes a shard through its async codec pipeline one inner chunk at a time: ~3 ms per image of
ViT-B@224 features even with no compressor, more than compressing them costs (docs/benchmarks.md, "The encode
stage's own ceiling"). This writer produces the same Zarr v3 `sharding_indexed` file (storage/README.md): each
inner chunk (one image) through the `bytes` codec (little endian) and the array's compressor from numcodecs,
then the index of (offset, nbytes) little-endian uint64 pairs and its CRC32C. The file is written under a
`.partial` name and renamed into place, so a killed writer never leaves half a shard; its SHA-256 is taken from
the bytes in memory instead of reading the file back. zarr-python and tensorstore read these files (tested).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from storage.layout import StoreError
from storage.shard_reader import ShardReader

_EMPTY = np.uint64(2**64 - 1)
_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))  # -1 where the system sets no limit


class ShardWriter:
    def __init__(self, array: zarr.Array, folder: Path):
        meta = array.metadata
        self.folder = folder
        self.shape = array.shape
        self.shard_rows = meta.chunk_grid.chunk_shape[0]
        self.dtype = np.dtype(array.dtype).newbyteorder("<")
        self.chunk_key = meta.encode_chunk_key
        inner = list(meta.codecs[0].codecs)
        self.encoder = numcodecs_codec(inner[1]) if len(inner) == 2 else None

    @classmethod
    def of(cls, array: zarr.Array, folder: Path) -> ShardWriter | None:
        """A writer for arrays the direct reader reads (the chains this module writes), else None."""
        if ShardReader.of(array, folder) is None:
            return None
        inner = list(array.metadata.codecs[0].codecs)
        if len(inner) == 2 and numcodecs_codec(inner[1]) is None:
            return None
        return cls(array, folder)

    def write(self, shard: int, values: np.ndarray) -> dict:
        """Write the rows of `shard` (all of them, in order) as one file; its size and SHA-256."""
        first = shard * self.shard_rows
        if values.shape != (min(self.shard_rows, self.shape[0] - first), *self.shape[1:]):
            raise ValueError(f"shard {shard}: values of shape {values.shape} do not fill the shard")
        values = np.ascontiguousarray(values, dtype=self.dtype)
        index = np.full((self.shard_rows, 2), _EMPTY, "<u8")
        pieces, offset = [], 0
        for row, chunk in enumerate(values):
            data = memoryview(self.encoder.encode(chunk) if self.encoder is not None else chunk).cast("B")
            index[row] = offset, data.nbytes
            pieces.append(data)
            offset += data.nbytes
        pieces.append(memoryview(numcodecs.CRC32C().encode(index.tobytes())))
        path = self.folder / self.chunk_key((shard,) + (0,) * (len(self.shape) - 1))
        check_still_there(self.folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        digest = hashlib.sha256()
        for piece in pieces:
            digest.update(piece)
        write_file(partial, pieces)
        os.replace(partial, path)
        return {"bytes": offset + pieces[-1].nbytes, "sha256": digest.hexdigest()}


def check_still_there(folder: Path) -> None:
    """Refuse to write into a store (or array) whose folder was removed under the writer: writing on would make
    a folder of loose shards that no reader opens."""
    if not (folder / "zarr.json").is_file():
        raise StoreError(
            f"{folder}: removed while it was being written; run the same command again to start it anew"
        )


def write_file(path: Path, pieces: list[memoryview]) -> None:
    """A new file of `pieces`, one after another (write_all)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        write_all(fd, pieces)
    except OSError as e:
        if e.filename is None:  # writev's errors (a full disk, a file size limit) name no file
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        os.close(fd)


def write_all(fd: int, pieces: list[memoryview]) -> None:
    """Write `pieces` one after another in as few system calls as the kernel takes (one per shard file,
    usually, not one per image): on the GPU host lent to issue 13, write calls to its /tmp took 2.7 ms each on
    average, ~5.9 ms per image, about what the encode stage lost there (docs/benchmarks.md)."""
    pieces = [piece for piece in pieces if piece.nbytes]
    while pieces:
        n = os.writev(fd, pieces[:_IOV_MAX])
        if n <= 0:
            raise OSError(f"write returned {n} with {sum(p.nbytes for p in pieces)} bytes left")
        while pieces and n >= pieces[0].nbytes:  # whole pieces written
            n -= pieces[0].nbytes
            pieces.pop(0)
        if n:  # a partial write ends inside this piece
            pieces[0] = pieces[0][n:]


def numcodecs_codec(codec):
    """numcodecs' twin of a zarr compressor codec (None: one this writer does not know)."""
    if isinstance(codec, BloscCodec):
        shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                   "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[codec.shuffle.value]  # fmt: skip
        return numcodecs.Blosc(codec.cname.value, codec.clevel, shuffle, codec.blocksize)
    if isinstance(codec, ZstdCodec) and not codec.checksum:
        return numcodecs.Zstd(codec.level)
    return None
