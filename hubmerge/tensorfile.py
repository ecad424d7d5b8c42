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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hubmerge.errors import SourceError, quoted
from hubmerge.limits import MAX_HEADER_BYTES

if TYPE_CHECKING:
    import torch

#: safetensors dtype code -> item size in bytes: the official library's dtypes of whole bytes.
ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "C64": 8,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
}
#: Packed sub-byte dtypes the official library knows, which hubmerge cannot slice by tensor.
_SUB_BYTE = frozenset({"F4", "F6_E2M3", "F6_E3M2"})

#: config/torch dtype names -> safetensors dtype codes (the float types hubmerge can compute in).
DTYPE_CODES: dict[str, str] = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
}
DTYPE_NAMES: dict[str, str] = {code: name for name, code in DTYPE_CODES.items()}

_NUMPY: dict[str, type[np.generic]] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
}
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
    """Parse a safetensors header, validated exactly as strictly as the `safetensors` library.

    The file is untrusted: a truncated download, a file that is not safetensors, or one crafted
    so that tensors overlap (one reads another's bytes) or reach into the header fails here,
    before anything is written, with the file and the tensor named. A message never quotes the
    file's bytes. On top of the library's rules, hubmerge refuses duplicate keys (JSON keeps the
    last, so a file could say two things) and dtypes packed below a byte.
    """
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise SourceError(f"{path}: not a readable safetensors file (under 8 bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise SourceError(
                    f"{path}: not a readable safetensors file "
                    f"(its header would be over {MAX_HEADER_BYTES:,} bytes)"
                )
            if 8 + header_len > size:
                raise SourceError(
                    f"{path}: not a readable safetensors file (its header runs past the end of "
                    "the file: truncated or corrupt download)"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise SourceError(f"{path}: not a readable safetensors file ({e.strerror})") from None
    header = _parse_header(raw, path)
    return _validate(header, path, data_start=8 + header_len, data_size=size - 8 - header_len)


def _parse_header(raw: bytes, path: Path) -> dict[str, object]:
    """The header's JSON object: UTF-8, strict JSON (no NaN), no duplicate keys."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SourceError(
            f"{path}: not a readable safetensors file (header is not UTF-8 at byte {e.start})"
        ) from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        problem = f"{e.msg} at byte {e.pos}"
    except _NotJson as e:
        problem = str(e)
    except RecursionError:
        problem = "nested too deeply"
    else:
        if isinstance(header, dict):
            return header
        problem = "not a JSON object"
    raise SourceError(f"{path}: not a readable safetensors file (header: {problem})")


class _NotJson(Exception):
    """What strict JSON refuses and Python's `json` would accept."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _NotJson(f"the key {quoted(key)} appears twice")
            seen.add(key)
    return result


def _no_constant(name: str) -> object:
    raise _NotJson(f"{name} is not JSON")


def _count(value: object) -> bool:
    """A JSON integer the library reads as an unsigned 64-bit count (bools are not)."""
    return type(value) is int and 0 <= value < 2**64


def _validate(
    header: dict[str, object], path: Path, *, data_start: int, data_size: int
) -> dict[str, TensorInfo]:
    """The library's rules: typed entries, sizes equal to shape x dtype, and offsets that tile
    the data exactly (sorted, from 0, no gap, no overlap, nothing after the last tensor).
    """
    entries: list[tuple[int, int, str, str, tuple[int, ...]]] = []
    for name, meta in header.items():
        if name == "__metadata__":
            if meta is not None and not (
                isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
            ):
                raise SourceError(f"{path}: __metadata__ must map strings to strings")
            continue
        where = f"{path}: tensor {quoted(name)}"
        if not isinstance(meta, dict):
            raise SourceError(f"{where}: its header entry is not an object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in meta:
                raise SourceError(f"{where}: its header entry has no {key}")
        dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ITEMSIZE:
            if isinstance(dtype, str) and dtype in _SUB_BYTE:
                raise SourceError(f"{where}: dtype {dtype} (packed below a byte) is not supported")
            raise SourceError(f"{where}: unknown dtype {quoted(dtype, 24)}")
        if not isinstance(shape, list) or not all(_count(d) for d in shape):
            raise SourceError(f"{where}: shape must be a list of integers >= 0")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))):
            raise SourceError(f"{where}: data_offsets must be two integers >= 0")
        nbytes = ITEMSIZE[dtype]
        for dim in shape:
            nbytes *= dim
            if nbytes >= 2**64:
                raise SourceError(f"{where}: shape x dtype overflows 64 bits")
        begin, end = offsets
        if end - begin != nbytes:
            raise SourceError(
                f"{where}: data_offsets span {end - begin} bytes, but its shape and dtype "
                f"({dtype}) need {nbytes}"
            )
        entries.append((begin, end, name, dtype, tuple(shape)))
    entries.sort()
    tensors: dict[str, TensorInfo] = {}
    position = 0
    for begin, end, name, dtype, shape in entries:
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap"
            raise SourceError(
                f"{path}: tensor {quoted(name)}: data_offsets [{begin}, {end}] {what} "
                "(each tensor must start where the one before ends)"
            )
        if end > data_size:
            raise SourceError(
                f"{path}: tensor {quoted(name)} lies outside the file "
                "(truncated or corrupt download)"
            )
        tensors[name] = TensorInfo(name, path, dtype, shape, data_start + begin, end - begin)
        position = end
    if position != data_size:
        raise SourceError(
            f"{path}: {data_size - position} bytes after the last tensor "
            "(the header must describe the whole file)"
        )
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
            offset = _write_chunk(arr, compute, out, fd, offset)


def _write_chunk(arr: np.ndarray, compute: str, out: str, fd: int, offset: int) -> int:
    """Write `compute` values `arr` cast to `out` at `fd`'s `offset`; the offset after them."""
    if out != compute:
        arr = _narrow(to_float32(arr, compute), out)
    return pwrite_all(fd, arr.tobytes(), offset)


def pwrite_all(fd: int, data: bytes, offset: int) -> int:
    """Write all of `data` at `fd`'s `offset` (pwrite may write less than asked); the end offset."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
    return offset


#: One term of a weighted sum: a stored tensor and its weight.
Term = tuple[TensorInfo, float]


def _blend_chunk(terms: Sequence[Term], compute: str, begin: int, count: int) -> np.ndarray:
    """Elements `begin`..`begin+count` of sum(w_i * t_i), in `compute`'s storage type.

    mergekit's `linear` (normalize: false) in the same steps: every tensor cast to `compute`,
    a float32 accumulator (float64 when `compute` is) starting at zero, `acc += t_i * w_i` in
    term order, the result cast back to `compute`. torch fuses each multiply-add (`addcmul_`
    rounds once), which float64 reproduces for float32 values: the product of two float32
    numbers is exact in float64, and the sum is rounded to float64, then to float32 (the two
    roundings differ from one only when the first lands exactly on a float32 tie: about one
    element in 2**28). A float64 model's blend rounds the product separately: numpy has no
    fused multiply-add.
    """
    wide = np.float64 if compute == "F64" else np.float32
    acc = np.zeros(count, dtype=np.float64)
    for info, weight in terms:
        storage = _storage_type(info)
        size = np.dtype(storage).itemsize
        with info.file.open("rb") as src:
            raw = os.pread(src.fileno(), count * size, info.offset + begin * size)
        arr = np.frombuffer(raw, dtype=storage)
        if compute != info.dtype:
            arr = _narrow(to_float32(arr, info.dtype), compute)
        product = to_float32(arr, compute).astype(np.float64) * np.float64(wide(weight))
        acc = (acc + product).astype(wide).astype(np.float64, copy=False)
    return _narrow(acc.astype(wide, copy=False), compute)


def _blend_chunks(terms: Sequence[Term], compute: str) -> Iterator[np.ndarray]:
    """sum(w_i * t_i) chunk by chunk (see `_blend_chunk`): one chunk per term in memory."""
    shapes = {info.shape for info, _ in terms}
    if not terms or len(shapes) > 1:
        names = ", ".join(sorted({f"{info.name} {list(info.shape)}" for info, _ in terms}))
        raise SourceError(f"tensors of different shapes cannot be summed ({names})")
    total = math.prod(terms[0][0].shape)
    # A zero-element tensor (a shape with a 0) is one empty chunk, not none.
    for begin in range(0, max(total, 1), _CHUNK):
        yield _blend_chunk(terms, compute, begin, min(_CHUNK, total - begin))


def weighted_sum(terms: Sequence[Term], compute: str, out: str, fd: int, offset: int) -> None:
    """Write sum(w_i * t_i) (see `_blend_chunk`), cast to `out`, at `fd`'s `offset`.

    Streams in cache-sized chunks like `transform`: memory stays at one chunk per term.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        for arr in _blend_chunks(terms, compute):
            offset = _write_chunk(arr, compute, out, fd, offset)


def read_weighted_sum(terms: Sequence[Term], compute: str) -> torch.Tensor:
    """sum(w_i * t_i) as `weighted_sum` writes it, as a torch tensor of dtype `compute`.

    OLM scores a blended candidate with exactly the values the writer later writes.
    """
    import torch

    with np.errstate(over="ignore", invalid="ignore"):
        chunks = list(_blend_chunks(terms, compute))
    arr = np.concatenate(chunks).reshape(terms[0][0].shape)
    tensor = torch.from_numpy(arr)
    return tensor.view(torch.bfloat16) if compute == "BF16" else tensor
