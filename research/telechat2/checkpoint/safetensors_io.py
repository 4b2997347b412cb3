"""Memory-mapped safetensors reading with validation (no torch, bf16 included).

The format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data. Every entry is checked against the file size before anything is read, so a truncated
or corrupt file is reported with its path and the offending tensor.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np

from ..errors import TeleChat2Error

# safetensors dtype -> (numpy dtype for the raw bytes, itemsize); BF16 is read as raw uint16
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(TeleChat2Error):
    """A checkpoint file or folder is unusable; the message names the file and tensor."""


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    out = bits.astype(np.uint32)            # one fp32-sized array, shifted in place
    out <<= 16
    return out.view(np.float32)


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16 bit pattern (uint16), as torch and MindSpore do."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = u + (np.uint32(0x7FFF) + ((u >> 16) & 1))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


class SafetensorsFile:
    """One .safetensors file: header parsed and validated on open, tensors memory-mapped on read."""

    def __init__(self, path: str):
        self.path = path
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open: {e.strerror}") from None
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{path}: corrupt safetensors header (header length {n}, file size {size})")
            try:
                header = json.loads(fh.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries = {}
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: tensor {name!r}: malformed header entry {e!r}") from None
            if dtype not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {name!r}: unsupported dtype {dtype!r}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
            if end - begin != nbytes or begin < 0:
                raise CheckpointError(f"{path}: tensor {name!r}: data_offsets {begin}..{end} do not match "
                                      f"shape {list(shape)} of {dtype}")
            if end > data_len:
                raise CheckpointError(f"{path}: tensor {name!r}: data ends at byte {end} but the file holds "
                                      f"{data_len} data bytes (truncated file?)")
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def dtype(self, name: str) -> str:
        return self.entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][1]

    def nbytes(self, name: str) -> int:
        _, _, begin, end = self.entries[name]
        return end - begin

    def read_raw(self, name: str) -> np.ndarray:
        """The stored values, memory-mapped (BF16 as its uint16 bit pattern)."""
        dtype, shape, begin, end = self.entries[name]
        if end == begin:
            return np.zeros(shape, SAFETENSORS_DTYPES[dtype])
        return np.memmap(self.path, dtype=SAFETENSORS_DTYPES[dtype], mode="r", offset=self.data_start + begin,
                         shape=shape)

    def read_block(self, name: str, axis: int, start: int, length: int) -> np.ndarray:
        """full[..., start:start+length, ...] along `axis` as an owned array, read with plain file reads (no
        mapping, so none of the file's pages count in this process's memory): a block of rows in one read
        straight into the result; a block of columns through a buffer of about BLOCK_BUFFER_BYTES of whole rows."""
        dtype, shape, begin, _ = self.entries[name]
        np_dtype = np.dtype(SAFETENSORS_DTYPES[dtype])
        if not 0 <= start <= start + length <= shape[axis]:
            raise ValueError(f"{self.path}: tensor {name!r}: block {start}..{start + length} outside axis {axis} "
                             f"of shape {list(shape)}")
        out = np.empty(shape[:axis] + (length,) + shape[axis + 1:], np_dtype)
        if out.size == 0:
            return out
        outer = int(np.prod(shape[:axis], dtype=np.int64))         # the tensor as [outer, shape[axis], inner]
        inner = int(np.prod(shape[axis + 1:], dtype=np.int64)) * np_dtype.itemsize
        row = shape[axis] * inner
        base = self.data_start + begin
        with open(self.path, "rb", buffering=0) as fh:
            if outer == 1:
                _read_exact(fh, base + start * inner, memoryview(out).cast("B"), self.path)
                return out
            dst = out.reshape(outer, length * inner // np_dtype.itemsize)
            rows = max(1, min(outer, BLOCK_BUFFER_BYTES // row))
            buf = np.empty((rows, row // np_dtype.itemsize), np_dtype)
            lo, hi = start * inner // np_dtype.itemsize, (start + length) * inner // np_dtype.itemsize
            for r in range(0, outer, rows):
                n = min(rows, outer - r)
                _read_exact(fh, base + r * row, memoryview(buf[:n]).cast("B"), self.path)
                dst[r:r + n] = buf[:n, lo:hi]
        return out

    def read_f32(self, name: str) -> np.ndarray:
        raw = self.read_raw(name)
        if self.dtype(name) == "BF16":
            return bf16_bits_to_f32(raw)
        return np.asarray(raw, dtype=np.float32)


BLOCK_BUFFER_BYTES = 16 * 2**20      # read_block of columns: rows are read through a buffer of about this size


def _read_exact(fh, offset: int, view: memoryview, path: str) -> None:
    fh.seek(offset)
    done = 0
    while done < len(view):
        n = fh.readinto(view[done:])
        if not n:
            raise CheckpointError(f"{path}: file ended at byte {offset + done} (truncated while reading?)")
        done += n


def write_safetensors(path: str, tensors, metadata: dict | None = None) -> dict:
    """Stream tensors into one .safetensors file without holding them; returns its sha256 and size (hashed
    as written, so a checkpoint writer need not read the file back).

    `tensors`: list of (name, dtype, shape, chunks) where `chunks()` yields numpy blocks whose raw bytes,
    concatenated, are the tensor in `dtype` (BF16 as uint16 bits). The header is written first from the
    shapes, then each tensor's bytes.
    """
    header, offset = {}, 0
    for name, dtype, shape, _ in tensors:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)             # keep the data 8-byte aligned, as the reference writer does
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        def write(data):
            digest.update(data)
            fh.write(data)
        write(struct.pack("<Q", len(blob)))
        write(blob)
        for name, dtype, shape, chunks in tensors:
            want = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            written = 0
            for block in chunks():
                data = np.ascontiguousarray(block)
                write(memoryview(data).cast("B"))
                written += data.nbytes
            if written != want:
                raise RuntimeError(f"{path}: tensor {name!r}: wrote {written} bytes, expected {want}")
    return {"sha256": digest.hexdigest(), "bytes": 8 + len(blob) + offset}
