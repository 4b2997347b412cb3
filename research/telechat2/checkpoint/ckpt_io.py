"""MindSpore `.ckpt` files, read and written one tensor at a time.

A .ckpt is a protobuf `Checkpoint { repeated Value value = 1 }` with
`Value { string tag = 1; TensorProto tensor = 2 }` and
`TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3 }`.
MindSpore writes a tensor larger than 512 MB as several consecutive values with the same tag (row slices),
and may append `crc_num` + 10 bytes. We parse the wire format directly so that a file of any size is
indexed without loading it, and tensors are memory-mapped on read.
"""
from __future__ import annotations

import os

import numpy as np

from .safetensors_io import CheckpointError

# MindSpore tensor_type <-> safetensors dtype names used across this package
MS_TYPE_TO_DTYPE = {"Float32": "F32", "Float16": "F16", "BFloat16": "BF16", "Float64": "F64", "Int64": "I64",
                    "Int32": "I32", "Int16": "I16", "Int8": "I8", "UInt8": "U8", "Bool": "BOOL"}
DTYPE_TO_MS_TYPE = {v: k for k, v in MS_TYPE_TO_DTYPE.items()}
SLICE_BYTES = 512 * 1024 * 1024     # MindSpore's slice size for large tensors


def _varint(buf, pos):
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise IndexError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _fields(buf, start, end):
    """(field number, wire type, value or (offset, length)) of one protobuf message in buf[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise IndexError("length past the end")
            yield field, wire, (pos, length)
            pos += length
        elif wire == 1:
            yield field, wire, None
            pos += 8
        elif wire == 5:
            yield field, wire, None
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


class CkptFile:
    """Index of a .ckpt: name -> (dtype, shape, [(offset, length), ...]) without reading tensor data."""

    def __init__(self, path: str):
        self.path = path
        try:
            buf = np.memmap(path, dtype=np.uint8, mode="r") if os.path.getsize(path) else np.zeros(0, np.uint8)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open: {e.strerror}") from None
        end = len(buf)
        if end >= 17 and bytes(buf[end - 17:end - 10]) == b"crc_num":
            end -= 17
        self.entries: dict[str, tuple[str, tuple[int, ...], list[tuple[int, int]]]] = {}
        mv = memoryview(buf)
        try:
            for field, wire, span in _fields(mv, 0, end):
                if field != 1 or wire != 2:
                    raise ValueError(f"unexpected top-level field {field}")
                self._add_value(mv, *span)
        except (IndexError, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not a readable MindSpore .ckpt (truncated, corrupt or encrypted?): {e}") \
                from None
        if not self.entries:
            raise CheckpointError(f"{path}: MindSpore .ckpt holds no tensors")

    def _add_value(self, mv, start, length):
        tag, tensor = None, None
        for field, wire, span in _fields(mv, start, start + length):
            if field == 1 and wire == 2:
                tag = bytes(mv[span[0]:span[0] + span[1]]).decode("utf-8")
            elif field == 2 and wire == 2:
                tensor = span
        if tag is None or tensor is None:
            return              # map tensors and other values are not model weights
        dims, ttype, content = [], None, (tensor[0], 0)
        for field, wire, span in _fields(mv, tensor[0], tensor[0] + tensor[1]):
            if field == 1 and wire == 0:
                dims.append(span)
            elif field == 1 and wire == 2:          # packed dims
                pos, stop = span[0], span[0] + span[1]
                while pos < stop:
                    d, pos = _varint(mv, pos)
                    dims.append(d)
            elif field == 2 and wire == 2:
                ttype = bytes(mv[span[0]:span[0] + span[1]]).decode("utf-8")
            elif field == 3 and wire == 2:
                content = span
        if ttype not in MS_TYPE_TO_DTYPE:
            raise CheckpointError(f"{self.path}: tensor {tag!r}: unsupported tensor_type {ttype!r}")
        dtype = MS_TYPE_TO_DTYPE[ttype]
        if tag in self.entries:                     # a further slice of a large tensor
            self.entries[tag][2].append(content)
        else:
            self.entries[tag] = (dtype, tuple(dims), [content])

    def validate(self, name):
        from .safetensors_io import SAFETENSORS_DTYPES
        dtype, shape, spans = self.entries[name]
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
        got = sum(n for _, n in spans)
        if got != want:
            raise CheckpointError(f"{self.path}: tensor {name!r}: holds {got} bytes, shape {list(shape)} of {dtype} "
                                  f"needs {want} (truncated or corrupt file?)")

    def read_raw(self, name) -> np.ndarray:
        from .safetensors_io import SAFETENSORS_DTYPES
        self.validate(name)
        dtype, shape, spans = self.entries[name]
        np_dtype = SAFETENSORS_DTYPES[dtype]
        if len(spans) == 1:
            off, n = spans[0]
            if n == 0:
                return np.zeros(shape, np_dtype)
            return np.memmap(self.path, dtype=np_dtype, mode="r", offset=off, shape=shape)
        parts = [np.memmap(self.path, dtype=np_dtype, mode="r", offset=off, shape=(n // np.dtype(np_dtype).itemsize,))
                 for off, n in spans]
        return np.concatenate(parts).reshape(shape)


def write_ckpt_tensor(fh, name: str, dtype: str, shape: tuple[int, ...], chunks) -> None:
    """Append one tensor to an open .ckpt file. `chunks` yields row-blocks of the tensor (numpy, any sizes)
    whose bytes add up to the tensor; tensors above 512 MB are written as row slices like MindSpore does."""
    from .safetensors_io import SAFETENSORS_DTYPES
    itemsize = np.dtype(SAFETENSORS_DTYPES[dtype]).itemsize
    total = int(np.prod(shape, dtype=np.int64)) * itemsize
    rows = shape[0] if shape else 1
    row_bytes = total // rows if rows else 0
    rows_per_slice = max(1, SLICE_BYTES // row_bytes) if row_bytes else rows or 1
    slices = [min(rows_per_slice, rows - r) for r in range(0, rows, rows_per_slice)] or [rows]
    pending = b""
    chunk_iter = iter(chunks)
    for slice_rows in slices:
        nbytes = slice_rows * row_bytes if shape else total
        dims = b"".join(b"\x08" + _encode_varint(d) for d in shape)
        ttype = DTYPE_TO_MS_TYPE[dtype].encode()
        tensor_head = dims + b"\x12" + _encode_varint(len(ttype)) + ttype + b"\x1a" + _encode_varint(nbytes)
        tensor_len = len(tensor_head) + nbytes
        tag = name.encode()
        value_head = b"\x0a" + _encode_varint(len(tag)) + tag + b"\x12" + _encode_varint(tensor_len) + tensor_head
        fh.write(b"\x0a" + _encode_varint(len(value_head) + nbytes) + value_head)
        remaining = nbytes
        while remaining:
            if not pending:
                pending = np.ascontiguousarray(next(chunk_iter)).tobytes()
            take = pending[:remaining]
            fh.write(take)
            pending = pending[len(take):]
            remaining -= len(take)
