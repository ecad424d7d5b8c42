"""The safetensors file format at the byte level: headers, offsets and dtype arithmetic.

The `safetensors` library reads and writes whole tensors; a streaming merge wants more: to know
where each tensor's bytes lie so an unscaled tensor is copied file-to-file by the kernel
(`copy_file_range`) without ever entering Python, and to lay out an output shard's header
before its data is written. The format is simple and stable (8-byte little-endian header length,
a JSON header, then the raw little-endian data), so this module reads and writes exactly that.

Arithmetic (scaling, dtype casts) is done in numpy, bit-exact with what torch does for
`tensor * scale` and `tensor.to(dtype)` (float32 math, round-to-nearest-even), so the merge path
never imports torch.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hubmerge.errors import SourceError

if TYPE_CHECKING:
    import torch

#: safetensors dtype code -> item size in bytes.
ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}

#: config/torch dtype names -> safetensors dtype codes (the float types hubmerge can compute in).
DTYPE_CODES: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
}
DTYPE_NAMES: dict[str, str] = {code: name for name, code in DTYPE_CODES.items()}

_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_MAX_HEADER = 100_000_000
#: Elements per arithmetic chunk: 1 MiB of float32, small enough to stay in L2.
_CHUNK = 1 << 18


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: file, absolute byte offset, size, dtype and shape."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header and check that every tensor lies inside the file.

    A truncated download or a file that is not safetensors fails here, before anything is
    written, with the file named in the message.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("file shorter than its 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as e:
        raise SourceError(f"{path}: not a readable safetensors file ({e})") from None
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = meta["dtype"], tuple(int(d) for d in meta["shape"])
            begin, end = (int(x) for x in meta["data_offsets"])
            expected = math.prod(shape) * ITEMSIZE[dtype]
        except (KeyError, TypeError, ValueError):
            raise SourceError(f"{path}: malformed header entry for tensor {name!r}") from None
        if end - begin != expected or data_start + end > size:
            raise SourceError(
                f"{path}: tensor {name!r} lies outside the file (truncated or corrupt download)"
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, expected)
    return tensors


def encode_header(entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """The header bytes (length prefix included) for tensors laid out back to back.

    `entries` are (name, dtype, shape, nbytes) in file order. The JSON is padded with spaces to
    a multiple of 8 bytes, as the reference writer does, so data stays aligned.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _storage_type(info: TensorInfo) -> type[np.generic]:
    """The numpy type holding `info`'s values (bf16 as uint16 bits); only float dtypes have one."""
    if info.dtype not in _NUMPY:
        raise SourceError(
            f"{info.file}: tensor {info.name!r} has dtype {info.dtype}, "
            "which hubmerge can copy but not scale or cast"
        )
    return _NUMPY[info.dtype]


def read_array(info: TensorInfo) -> np.ndarray:
    """Read one tensor as a flat numpy array of its storage type (bf16 as uint16 bits)."""
    return np.fromfile(
        info.file, dtype=_storage_type(info), count=math.prod(info.shape), offset=info.offset
    )


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """Read one tensor into torch in its stored dtype and shape (for NER and OLM, not merging)."""
    import torch

    tensor = torch.from_numpy(read_array(info).reshape(info.shape))
    return tensor.view(torch.bfloat16) if info.dtype == "BF16" else tensor


def to_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """Widen stored values to float32 (float64 stays float64, so no precision is lost)."""
    if dtype == "BF16":
        return np.left_shift(arr, 16, dtype=np.uint32).view(np.float32)
    if dtype == "F64":
        return arr
    return arr.astype(np.float32)


def _narrow(wide: np.ndarray, dtype: str) -> np.ndarray:
    """Round float32/float64 values to `dtype`'s storage type (nearest even; may reuse `wide`)."""
    if dtype != "BF16":
        return wide.astype(_NUMPY[dtype])
    if wide.dtype != np.float32:
        wide = wide.astype(np.float32)
    nan = np.isnan(wide)
    bits = wide.view(np.uint32)
    lsb = (bits >> 16) & 1
    bits += 0x7FFF
    bits += lsb
    bits >>= 16
    if nan.any():  # rounding could carry a NaN's mantissa into the exponent: keep it a NaN
        bits[nan] = 0x7FC0
    return bits.astype(np.uint16)


def transform(info: TensorInfo, scale: float, compute: str, out: str, fd: int, offset: int) -> None:
    """Write `info`'s tensor cast to `compute`, times `scale`, cast to `out`, at `fd`'s `offset`.

    This is the sequence mergekit runs for a passthrough tensor (load as `dtype`, multiply,
    save as `out_dtype`), each step rounding as torch does, so the results are bit-identical.
    It works in cache-sized chunks with in-place arithmetic: memory stays at one chunk and the
    CPU cost is a few passes over L2-resident data instead of over the whole tensor.
    """
    storage = _storage_type(info)
    itemsize = ITEMSIZE[info.dtype]
    # Overflow to inf and NaN propagation are the intended IEEE results, as in torch.
    with info.file.open("rb") as src, np.errstate(over="ignore", invalid="ignore"):
        for begin in range(0, info.nbytes, _CHUNK * itemsize):
            raw = os.pread(
                src.fileno(), min(_CHUNK * itemsize, info.nbytes - begin), info.offset + begin
            )
            arr = np.frombuffer(raw, dtype=storage)
            if compute != info.dtype:
                arr = _narrow(to_float32(arr, info.dtype), compute)
            if scale != 1.0:
                wide = to_float32(arr, compute)
                if wide is arr:  # float64 storage is widened in place: copy the read-only view
                    wide = arr.copy()
                wide *= wide.dtype.type(scale)
                arr = _narrow(wide, compute)
            if out != compute:
                arr = _narrow(to_float32(arr, compute), out)
            data = memoryview(arr.tobytes())
            while data:  # pwrite may write less than asked
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
