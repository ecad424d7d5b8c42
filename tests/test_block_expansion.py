"""Block expansion adds identity blocks: the expanded model computes the original's function."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import logits, run_cli, tensors, write_yaml
from tests.tinymodels import CONFIGS, make_model

TOKENS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("pattern", [{"interleave": 2}, {"append": 3}])
def test_expanded_model_computes_the_same_function(
    kind: str, pattern: dict, tmp_path: Path
) -> None:
    source = make_model(kind, tmp_path / kind)
    config = write_yaml(
        tmp_path / "c.yaml", {"merge_method": "block_expansion", "model": str(source)} | pattern
    )
    result = run_cli("merge", config, tmp_path / "out")
    assert result.exit_code == 0, result.output

    out_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_config["num_hidden_layers"] == (6 if "interleave" in pattern else 7)
    if "layer_types" in out_config:
        assert len(out_config["layer_types"]) == out_config["num_hidden_layers"]
    torch.testing.assert_close(
        logits(tmp_path / "out", TOKENS), logits(source, TOKENS), rtol=1e-5, atol=1e-5
    )


def test_llama_pro_layout_and_bf16(models: dict[str, Path], tmp_path: Path) -> None:
    """interleave: 2 on 4 layers gives 0 1 1' 2 3 3' with o_proj/down_proj zeroed in the copies."""
    config = write_yaml(
        tmp_path / "c.yaml",
        {"merge_method": "block_expansion", "model": str(models["llama"]), "interleave": 2},
    )
    assert run_cli("merge", config, tmp_path / "out").exit_code == 0
    src, out = tensors(models["llama"]), tensors(tmp_path / "out")
    for out_index, src_index, copy in [
        (0, 0, False),
        (1, 1, False),
        (2, 1, True),
        (3, 2, False),
        (4, 3, False),
        (5, 3, True),
    ]:
        for suffix in (
            "self_attn.q_proj.weight",
            "mlp.up_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.down_proj.weight",
            "input_layernorm.weight",
        ):
            got = out[f"model.layers.{out_index}.{suffix}"]
            want = src[f"model.layers.{src_index}.{suffix}"]
            assert got.dtype == torch.bfloat16
            if copy and ("o_proj" in suffix or "down_proj" in suffix):
                assert not got.any()
            else:
                assert torch.equal(got, want)
    tokens = TOKENS[:1]
    torch.testing.assert_close(
        logits(tmp_path / "out", tokens), logits(models["llama"], tokens), rtol=1.6e-2, atol=1e-2
    )


def test_qwen2_biases_zeroed_and_layer_types_rewritten(
    models: dict[str, Path], tmp_path: Path
) -> None:
    config = write_yaml(
        tmp_path / "c.yaml",
        {"merge_method": "block_expansion", "model": str(models["qwen2"]), "append": 2},
    )
    assert run_cli("merge", config, tmp_path / "out").exit_code == 0
    out = tensors(tmp_path / "out")
    # Qwen2 has no o_proj bias but the zero filter must catch every matching tensor there is.
    assert not out["model.layers.5.self_attn.o_proj.weight"].any()
    assert torch.equal(
        out["model.layers.5.self_attn.q_proj.bias"], out["model.layers.3.self_attn.q_proj.bias"]
    )
    assert "lm_head.weight" not in out  # tied embeddings: no lm_head invented
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["layer_types"] == ["full_attention"] * 6
    assert cfg["max_window_layers"] == 6


def test_zero_filter_that_matches_nothing_is_refused(
    models: dict[str, Path], tmp_path: Path
) -> None:
    config = write_yaml(
        tmp_path / "c.yaml",
        {
            "merge_method": "block_expansion",
            "model": str(models["llama"]),
            "append": 1,
            "zero": ["out_proj"],
        },
    )
    result = run_cli("merge", config, tmp_path / "out")
    assert result.exit_code == 2
    assert "zero: 'out_proj' matches no tensor in layer 0" in result.output
    assert not (tmp_path / "out").exists()
