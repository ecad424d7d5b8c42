"""The numpy arithmetic of the merge path is bit-identical to torch's, special values included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hubmerge.tensorfile import read_header, read_weighted_sum, transform, weighted_sum

TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@pytest.mark.parametrize("src", sorted(TORCH))
@pytest.mark.parametrize("compute", sorted(TORCH))
@pytest.mark.parametrize("out", ["BF16", "F32"])
def test_transform_matches_torch(
    tmp_path: Path, src: str, compute: str, out: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hubmerge.tensorfile._CHUNK", 4096)  # many chunks, and a ragged last one
    special = torch.tensor(
        [
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
            float("nan"),
            1e-40,
            65504.0,
            1.00390625,
            1.01171875,
            -3.3e38,
        ]
    )
    values = torch.cat([special, torch.randn(20_000) * 3]).to(TORCH[src])
    save_file({"w": values}, tmp_path / "t.safetensors")
    info = read_header(tmp_path / "t.safetensors")["w"]
    for scale in (1.0, 1.5, 0.0, -0.3, 3.14159):
        target = tmp_path / "out.bin"
        with target.open("wb") as f:
            transform(info, scale, compute, out, f.fileno(), 0)
        got = torch.frombuffer(bytearray(target.read_bytes()), dtype=TORCH[out])
        expected = values.to(TORCH[compute])
        if scale != 1.0:
            expected = expected * scale
        expected = expected.to(TORCH[out])
        assert torch.equal(got.isnan(), expected.isnan())
        same = got == expected
        assert bool((same | expected.isnan()).all()), (src, compute, out, scale)
        # Signed zeros too: compare the sign bits where values are zero.
        zeros = expected == 0
        assert torch.equal(torch.signbit(got[zeros]), torch.signbit(expected[zeros]))


@pytest.mark.parametrize("compute", ["F32", "BF16"])
def test_blends_of_zero_element_tensors_are_empty_not_errors(tmp_path: Path, compute: str) -> None:
    """A shape with a 0 in it (legal in safetensors) blends to an empty tensor of that shape,
    read and written alike, beside a normal tensor whose blend torch computes the same."""
    save_file({"empty": torch.zeros(0, 4), "w": torch.randn(3, 5)}, tmp_path / "t.safetensors")
    header = read_header(tmp_path / "t.safetensors")
    empty = read_weighted_sum([(header["empty"], 0.5), (header["empty"], 0.5)], compute)
    assert empty.shape == (0, 4) and empty.dtype == TORCH[compute]
    target = tmp_path / "out.bin"
    with target.open("wb") as f:
        weighted_sum(
            [(header["empty"], 0.5), (header["empty"], 0.5)], compute, "F32", f.fileno(), 0
        )
    assert target.read_bytes() == b""
    got = read_weighted_sum([(header["w"], 0.5), (header["w"], 0.25)], compute)
    original = load_file(tmp_path / "t.safetensors")["w"].to(TORCH[compute]).float()
    expected = (original * 0.5 + original * 0.25).to(TORCH[compute])
    assert torch.equal(got, expected)
