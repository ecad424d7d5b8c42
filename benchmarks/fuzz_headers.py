"""Fuzz hubmerge's safetensors header parser against the official `safetensors` library.

Each case is a valid file (a few tensors of several dtypes, a zero-size one, a scalar and
`__metadata__`) with random mutations: JSON-level ones (a field replaced by a value of another
type, a negative, a float, a bool, a huge integer; offsets shifted or swapped; dtypes and shapes
changed; entries added, removed or made non-objects; the header made a list) and byte-level ones
(bytes flipped in the header, the length prefix changed, the file cut or extended). For every
case, `hubmerge.tensorfile.read_header` must

- raise nothing but `SourceError` (no crash, no hang: each case is a few kilobytes),
- accept exactly what the official library accepts, except where hubmerge is documented to be
  stricter (a key given twice, dtypes packed below a byte),
- and, when it accepts, place every tensor inside the file's data, with the very bytes the
  official library reads for it.

The test suite runs a small fixed-seed batch (tests/test_untrusted_headers.py); run more here::

    python benchmarks/fuzz_headers.py --count 100000 --seed 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import struct
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from hubmerge.errors import SourceError
from hubmerge.tensorfile import ITEMSIZE, read_header

#: Where hubmerge refuses what the official library accepts, on purpose (see `read_header`).
STRICTER = ("appears twice", "packed below a byte")
#: Dtypes numpy reads through the official library, to compare tensor bytes.
_NUMPY_DTYPES = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL", "U16", "U32"}
_ODD_VALUES: list[Any] = [
    -1,
    -8,
    0,
    1,
    7,
    2**63,
    2**64,
    2**70,
    1.0,
    0.5,
    -0.0,
    True,
    False,
    None,
    "",
    "8",
    [],
    [0],
    [0, 1, 2],
    {},
    {"a": 1},
]


def valid_file() -> tuple[dict[str, Any], bytes]:
    """A valid file's header (as a dict) and its data bytes."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.standard_normal((4, 3), dtype=np.float32),
        "model.layers.0.mlp.down_proj.weight": rng.standard_normal((3, 2)).astype(np.float16),
        "model.layers.0.self_attn.o_proj.bias": np.arange(5, dtype=np.int64),
        "model.norm.weight": np.ones(3, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "scalar": np.array(2.5, dtype=np.float64),
        "mask": np.array([True, False, True]),
    }
    blob = save(arrays, metadata={"format": "pt"})
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def encode(header: Any, data: bytes, rng: random.Random) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * rng.choice([0, 0, 1, 7])
    return struct.pack("<Q", len(raw)) + raw + data


def mutate(rng: random.Random, header: dict[str, Any], data: bytes) -> bytes:
    """One random mutation (sometimes several) of the valid file."""
    header = json.loads(json.dumps(header))
    names = [k for k in header if k != "__metadata__"]
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        kind = rng.randrange(13)
        name = rng.choice(names)
        entry = header.get(name)
        if not isinstance(entry, dict):
            continue
        if kind == 0:  # a field replaced by a value of any type
            entry[rng.choice(["dtype", "shape", "data_offsets"])] = rng.choice(_ODD_VALUES)
        elif kind == 1:  # one offset moved
            offsets = entry.get("data_offsets")
            if isinstance(offsets, list) and len(offsets) == 2:
                offsets[rng.randrange(2)] += rng.choice([-9, -8, -4, -1, 1, 2, 4, 8, 100])
        elif kind == 2:  # two tensors' offsets swapped
            other = header.get(rng.choice(names))
            if isinstance(other, dict) and "data_offsets" in entry and "data_offsets" in other:
                entry["data_offsets"], other["data_offsets"] = (
                    other["data_offsets"],
                    entry["data_offsets"],
                )
        elif kind == 3:  # another dtype, known or not
            entry["dtype"] = rng.choice([*ITEMSIZE, "F4", "f32", "X", "F8_E4M3FN", "FLOAT"])
        elif kind == 4:  # a dimension changed
            shape = entry.get("shape")
            if isinstance(shape, list) and shape:
                shape[rng.randrange(len(shape))] = rng.choice(_ODD_VALUES)
            elif isinstance(shape, list):
                shape.append(rng.choice([0, 1, 2]))
        elif kind == 5:  # a field removed
            entry.pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
        elif kind == 6:  # an entry removed (leaves a gap, or not at the end)
            header.pop(name, None)
        elif kind == 7:  # a tensor added that overlaps or follows the others
            start = rng.choice([0, 4, 8, len(data), len(data) + 4])
            header[f"extra{rng.randrange(3)}"] = {
                "dtype": "U8",
                "shape": [4],
                "data_offsets": [start, start + 4],
            }
        elif kind == 8:  # the entry itself made a non-object
            header[name] = rng.choice(_ODD_VALUES)
        elif kind == 9:
            header["__metadata__"] = rng.choice([*_ODD_VALUES, {"k": "v"}, {"k": 1}])
        elif kind == 10:  # an unknown field (the library ignores it)
            entry[rng.choice(["x", "offsets", "dtype2"])] = rng.choice(_ODD_VALUES)
        elif kind == 11:  # shape and offsets scaled together (still consistent, or not)
            if isinstance(entry.get("shape"), list) and entry["shape"]:
                entry["shape"][0] = rng.choice([0, 1, 2]) * (entry["shape"][0] or 1)
        else:  # the header is not an object
            return encode(rng.choice([[], 0, "x", None, [header]]), data, rng)
    blob = bytearray(encode(header, data, rng))
    byte_kind = rng.randrange(12)  # mostly none: most cases stay near-valid JSON
    (n,) = struct.unpack("<Q", blob[:8])
    if byte_kind == 0:  # a few header bytes flipped
        for _ in range(rng.randint(1, 3)):
            blob[8 + rng.randrange(n)] = rng.randrange(256)
    elif byte_kind == 1:  # the length prefix off by a little, or anything
        new = rng.choice([n - 1, n + 1, n + 8, 0, 2**64 - 1, 100_000_001, rng.randrange(2**64)])
        blob[:8] = struct.pack("<Q", max(new, 0))
    elif byte_kind == 2:  # cut
        del blob[rng.randrange(len(blob)) :]
    elif byte_kind == 3:  # extended
        blob += bytes(rng.choice([1, 4, 8]))
    return bytes(blob)


def official(path: Path) -> dict[str, bytes] | None:
    """The official library's reading: tensor bytes by name (numpy dtypes), None if refused."""
    try:
        f = safe_open(str(path), framework="np")
    except Exception:  # SafetensorError, the library's verdict
        return None
    result = {}
    with f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no iteration
            result[key] = b""
            if f.get_slice(key).get_dtype() in _NUMPY_DTYPES:
                # Valid, but numpy may not hold it (a dimension over 2**63): no bytes to compare.
                with contextlib.suppress(Exception):
                    result[key] = f.get_tensor(key).tobytes()
    return result


@dataclass
class Report:
    cases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    #: (case number, what went wrong): crashes, disagreements, reads outside the file.
    failures: list[tuple[int, str]] = field(default_factory=list)


def check(blob: bytes, path: Path) -> str | None:
    """What is wrong with hubmerge's verdict on `blob`, or None; `path` is scratch space."""
    path.write_bytes(blob)
    return compare(path, blob, official(path))


def compare(path: Path, blob: bytes, theirs: dict[str, bytes] | None) -> str | None:
    """What is wrong with hubmerge's verdict on the file `blob` at `path`, given the library's."""
    try:
        ours = read_header(path)
    except SourceError as e:
        message = str(e)
        if "\n" in message or len(message) > 400:
            return f"an unruly message: {message[:100]!r}"
        if theirs is not None and not any(s in message for s in STRICTER):
            return f"refused what the library accepts: {message}"
        return None
    except Exception as e:  # any other exception is the bug this fuzzer hunts
        return f"crashed: {type(e).__name__}: {e}"
    if theirs is None:
        return "accepted what the library refuses"
    (n,) = struct.unpack("<Q", blob[:8])
    if set(ours) != set(theirs):
        return "a different set of tensors"
    for name, info in ours.items():
        if info.offset < 8 + n or info.offset + info.nbytes > len(blob):
            return f"tensor {name!r} lies outside the file's data"
        if theirs[name] and blob[info.offset : info.offset + info.nbytes] != theirs[name]:
            return f"tensor {name!r}: other bytes than the library reads"
    return None


def run(count: int, seed: int, *, time_limit: float = float("inf")) -> Report:
    """`count` mutated files (stopping early after `time_limit` seconds)."""
    rng = random.Random(seed)
    header, data = valid_file()
    report = Report()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hubmerge-fuzz-") as tmp:
        path = Path(tmp) / "case.safetensors"
        for case in range(count):
            if time.monotonic() - start > time_limit:
                break
            blob = mutate(rng, header, data)
            path.write_bytes(blob)
            theirs = official(path)
            problem = compare(path, blob, theirs)
            report.cases += 1
            report.outcomes["refused" if theirs is None else "accepted"] += 1
            if problem:
                report.failures.append((case, problem))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    start = time.monotonic()
    report = run(args.count, args.seed)
    elapsed = time.monotonic() - start
    print(
        f"{report.cases} mutated headers in {elapsed:.1f} s "
        f"({report.outcomes['accepted']} accepted by the official library, "
        f"{report.outcomes['refused']} refused): {len(report.failures)} problems"
    )
    for case, problem in report.failures[:20]:
        print(f"  case {case}: {problem}")
    raise SystemExit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
