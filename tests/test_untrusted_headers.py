"""Crafted safetensors headers: hubmerge's verdict is the official `safetensors` library's.

Each case is a file written byte by byte; the official library (`safe_open`) reads the same
file, and hubmerge must refuse exactly what it refuses (with a `SourceError` naming the file
and, where there is one, the tensor) and read exactly the bytes it reads otherwise. A fuzz run
of mutated headers (`benchmarks/fuzz_headers.py`, a small fixed-seed batch here) checks the
same over thousands of files.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save

from hubmerge.errors import SourceError
from hubmerge.tensorfile import read_header
from tests.helpers import write_yaml
from tests.test_bad_input import assert_refused

ROOT = Path(__file__).resolve().parents[1]
F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def crafted(header: Any, data: bytes = b"\0" * 8, *, raw: bytes | None = None) -> bytes:
    text = json.dumps(header).encode() if raw is None else raw
    return struct.pack("<Q", len(text)) + text + data


def official_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="np") as f:
            list(f.keys())  # noqa: SIM118 - safe_open has no iteration
    except Exception:  # SafetensorError
        return False
    return True


def two(a: list[int], b: list[int], data: int = 16) -> tuple[dict[str, Any], bytes]:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": a},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": b},
    }
    return header, b"\0" * data


CASES: dict[str, bytes] = {
    "valid": crafted({"__metadata__": {"format": "pt"}, "a": F32x2}),
    "valid, padded with spaces": crafted(None, raw=json.dumps({"a": F32x2}).encode() + b"    "),
    "valid, unknown field ignored": crafted({"a": F32x2 | {"extra": [1]}}),
    "valid, empty": crafted({}, b""),
    "valid, zero-size tensor": crafted(
        {"a": F32x2, "z": {"dtype": "F32", "shape": [0, 5], "data_offsets": [8, 8]}}
    ),
    "valid, scalar": crafted({"s": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, b"1234"),
    "valid, tensors out of order": crafted(*two([8, 16], [0, 8])),
    "overlapping offsets": crafted(*two([0, 8], [4, 12])),
    "the same bytes twice": crafted(*two([0, 8], [0, 8], data=8)),
    "a gap between tensors": crafted(*two([0, 8], [12, 20], data=20)),
    "not starting at 0": crafted({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}),
    "negative offset": crafted({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}),
    "reversed offsets": crafted({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}),
    "past the data": crafted({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}),
    "trailing bytes": crafted({"a": F32x2}, b"\0" * 12),
    "data but no tensors": crafted({}, b"\0" * 8),
    "negative dimension": crafted({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}),
    "float dimension": crafted({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}),
    "bool dimension": crafted(
        {"a": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}}, b"x"
    ),
    "float offset": crafted({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}}),
    "string offset": crafted({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}),
    "three offsets": crafted({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}),
    "shape times dtype differs": crafted(
        {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    ),
    "overflowing shape": crafted(
        {"a": {"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 8]}}
    ),
    "unknown dtype": crafted({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}),
    "dtype not a string": crafted({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}),
    "no shape": crafted({"a": {"dtype": "F32", "data_offsets": [0, 8]}}),
    "entry not an object": crafted({"a": [0, 8]}),
    "header a list": crafted([F32x2]),
    "header a number": crafted(8),
    "metadata not strings": crafted({"__metadata__": {"format": 1}, "a": F32x2}),
    "metadata a list": crafted({"__metadata__": ["pt"], "a": F32x2}),
    "NaN in the header": crafted(
        None, raw=b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": NaN}}'
    ),
    "header not UTF-8": crafted(None, raw=json.dumps({"a": F32x2}).encode("utf-16")),
    "a duplicated field": crafted(
        None, raw=b'{"a": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    ),
    "header cut short": crafted(None, raw=json.dumps({"a": F32x2}).encode()[:-3]),
    "header length past the file": struct.pack("<Q", 10**6) + b"{}",
    "header length over 100 MB": struct.pack("<Q", 100_000_001) + b"{}" + b" " * 64,
    "header length of 2**64 - 1": struct.pack("<Q", 2**64 - 1) + b"{}",
    "shorter than 8 bytes": b"\x02\0\0",
    "empty file": b"",
}
#: Where hubmerge is stricter than the library, on purpose (see `tensorfile.read_header`).
STRICTER: dict[str, bytes] = {
    "a tensor named twice": crafted(
        None,
        raw=b'{"a": ' + json.dumps(F32x2).encode() + b', "a": ' + json.dumps(F32x2).encode() + b"}",
    ),
    "a dtype packed below a byte": crafted(
        {"a": {"dtype": "F4", "shape": [16], "data_offsets": [0, 8]}}
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_matches_the_official_library(case: str, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(CASES[case])
    expected = official_accepts(path)
    assert expected == case.startswith("valid")  # the table says what the library says
    if expected:
        tensors = read_header(path)
        with safe_open(str(path), framework="np") as f:
            assert sorted(tensors) == sorted(f.keys())  # noqa: SIM118
            for name, info in tensors.items():
                assert info.shape == tuple(f.get_slice(name).get_shape())
                data = path.read_bytes()[info.offset : info.offset + info.nbytes]
                assert data == f.get_tensor(name).tobytes()
        return
    with pytest.raises(SourceError) as refused:
        read_header(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    what = ("not a readable", "tensor '", "__metadata__", "bytes after the last tensor")
    assert any(w in message for w in what), message


@pytest.mark.parametrize("case", list(STRICTER))
def test_stricter_than_the_library_on_purpose(case: str, tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(STRICTER[case])
    assert official_accepts(path)
    with pytest.raises(SourceError, match="appears twice|packed below a byte"):
        read_header(path)


def test_a_real_file_reads_as_the_library_reads_it(tmp_path: Path) -> None:
    arrays: dict[str, np.ndarray] = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.arange(5, dtype=np.int64),
        "m": np.array([True, False]),
        "h": np.ones((2, 2), dtype=np.float16),
    }
    path = tmp_path / "x.safetensors"
    path.write_bytes(save(arrays, metadata={"format": "pt"}))
    tensors = read_header(path)
    blob = path.read_bytes()
    for name, array in arrays.items():
        info = tensors[name]
        assert info.shape == array.shape
        assert blob[info.offset : info.offset + info.nbytes] == array.tobytes()


def test_errors_never_quote_the_files_bytes(tmp_path: Path) -> None:
    """A file that is not safetensors (here: text) is named, its contents never shown."""
    path = tmp_path / "model.safetensors"
    for text in (b"daemon:x:1:1:SECRET:/usr/sbin:/usr/sbin/nologin\n", b"\x10\0\0\0\0\0\0\0SECRET"):
        path.write_bytes(text * 4)
        with pytest.raises(SourceError) as refused:
            read_header(path)
        message = str(refused.value).removeprefix(str(path))
        assert "SECRET" not in message and "daemon" not in message
        # Nor the numbers the first bytes make: the header length read from them.
        assert str(struct.unpack("<Q", text[:8])[0]) not in message


def _fuzzer() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "fuzz_headers", ROOT / "benchmarks" / "fuzz_headers.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_fuzzed_headers_never_crash_and_never_read_outside_the_file() -> None:
    fuzz = _fuzzer()
    report = fuzz.run(2000, seed=12, time_limit=120)
    assert report.cases >= 500  # a slow machine stops early, never below this
    assert report.failures == []
    # Both verdicts occur often enough for the comparison to mean something.
    assert report.outcomes["accepted"] > 50 and report.outcomes["refused"] > 50


@pytest.mark.parametrize("case", ["overlapping offsets", "trailing bytes", "negative dimension"])
def test_a_crafted_shard_stops_the_merge_in_one_line(
    models: dict[str, Path], tmp_path: Path, case: str
) -> None:
    model = Path(shutil.copytree(models["llama"], tmp_path / "crafted"))
    weights = model / "model.safetensors"
    header = read_header(weights)
    first = min(header.values(), key=lambda t: t.offset)
    raw = json.loads(weights.read_bytes()[8 : first.offset])
    name = next(n for n in raw if n != "__metadata__" and raw[n]["data_offsets"][0] == 0)
    second = next(n for n, t in raw.items() if n != "__metadata__" and t["data_offsets"][0] > 0)
    data = weights.read_bytes()[first.offset :]
    if case == "overlapping offsets":
        raw[second]["data_offsets"] = [o - 2 for o in raw[second]["data_offsets"]]
    elif case == "trailing bytes":
        data += b"\0" * 16
    else:
        raw[name]["shape"] = [-d for d in raw[name]["shape"]]
    weights.write_bytes(crafted(raw, data))
    config = write_yaml(
        tmp_path / "c.yaml", {"merge_method": "block_expansion", "model": "crafted", "append": 1}
    )
    start = time.monotonic()
    assert_refused(tmp_path, config, "model.safetensors")
    assert time.monotonic() - start < 10  # headers only: far under a second on a quiet machine
