"""Scaled passthrough: tensors equal mergekit's arithmetic, computed here from the sources."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml

from tests.helpers import cache_repo, logits, run_cli, tensors, write_yaml

TOKENS = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(0))


def merged(tmp_path: Path, config: dict, *args: str) -> dict[str, torch.Tensor]:
    result = run_cli("merge", write_yaml(tmp_path / "c.yaml", config), tmp_path / "out", *args)
    assert result.exit_code == 0, result.output
    return tensors(tmp_path / "out")


def expect(
    src: torch.Tensor,
    scale: float,
    compute: torch.dtype | None = None,
    out: torch.dtype | None = None,
) -> torch.Tensor:
    """mergekit: cast to `dtype`, multiply (torch rounding), cast to `out_dtype`."""
    x = src.to(compute) if compute else src
    if scale != 1.0:
        x = x * scale
    return x.to(out) if out else x


def test_number_gradient_and_filters(models: dict[str, Path], tmp_path: Path) -> None:
    m = str(models["llama12"])
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": m, "layer_range": [0, 2], "parameters": {"scale": 0.5}}]},
            {
                "sources": [{"model": m, "layer_range": [2, 5]}],
                "parameters": {"scale": [1.0, 2.0]},
            },  # gradient: t = 0, 0.5, 1
            {
                "sources": [
                    {
                        "model": m,
                        "layer_range": [9, 12],
                        "parameters": {
                            "scale": [
                                {
                                    "filter": "layers.1",
                                    "value": 3.0,
                                },  # substring: matches layers 10 and 11
                                {"filter": "o_proj", "value": [1.0, 4.0]},
                                {"filter": "*", "value": 1.0},
                            ]
                        },
                    }
                ]
            },
        ],
        "parameters": {"scale": 7.0},  # never reached: every slice resolves its own scale
        "dtype": "bfloat16",
    }
    out = merged(tmp_path, config)
    src = tensors(models["llama12"])
    bf16 = torch.bfloat16
    name = "self_attn.o_proj.weight"
    # Slice 0: a plain number scales every tensor of the slice, and the embeddings (t = 0).
    assert torch.equal(
        out["model.embed_tokens.weight"], expect(src["model.embed_tokens.weight"], 0.5, bf16)
    )
    assert torch.equal(
        out["model.layers.1.mlp.up_proj.weight"],
        expect(src["model.layers.1.mlp.up_proj.weight"], 0.5, bf16),
    )
    # Slice 1: gradient 1 -> 2 over three layers.
    for out_i, src_i, scale in [(2, 2, 1.0), (3, 3, 1.5), (4, 4, 2.0)]:
        assert torch.equal(
            out[f"model.layers.{out_i}.{name}"],
            expect(src[f"model.layers.{src_i}.{name}"], scale, bf16),
        )
    # Slice 2: layers.1 matches 10 and 11 first; layer 9's o_proj takes the gradient at t = 0.
    assert torch.equal(
        out[f"model.layers.5.{name}"], expect(src[f"model.layers.9.{name}"], 1.0, bf16)
    )
    assert torch.equal(
        out["model.layers.5.mlp.down_proj.weight"],
        expect(src["model.layers.9.mlp.down_proj.weight"], 1.0, bf16),
    )
    for out_i, src_i in [(6, 10), (7, 11)]:
        for suffix in (name, "mlp.gate_proj.weight", "post_attention_layernorm.weight"):
            assert torch.equal(
                out[f"model.layers.{out_i}.{suffix}"],
                expect(src[f"model.layers.{src_i}.{suffix}"], 3.0, bf16),
            )
    # The head follows the last slice at t = 1: '*' -> 1.0 (the top-level 7.0 is never used).
    assert torch.equal(out["model.norm.weight"], expect(src["model.norm.weight"], 1.0, bf16))
    assert len([k for k in out if k.endswith(name)]) == 8


def test_lookup_falls_through_levels_and_out_dtype(models: dict[str, Path], tmp_path: Path) -> None:
    m = str(models["llama"])
    config = {
        "merge_method": "passthrough",
        "slices": [
            {
                "sources": [
                    {
                        "model": m,
                        "layer_range": [0, 2],
                        "parameters": {"scale": [{"filter": "down_proj", "value": 2.5}]},
                    }
                ],  # no match -> slice level
                "parameters": {"scale": [{"filter": "q_proj", "value": 1.25}]},
            }
        ],  # no match -> top
        "parameters": {"scale": [{"filter": "up_proj", "value": 0.75}]},
        "dtype": "float32",
        "out_dtype": "float16",
    }
    out = merged(tmp_path, config)
    src = tensors(models["llama"])
    f32, f16 = torch.float32, torch.float16
    for suffix, scale in [
        ("mlp.down_proj.weight", 2.5),
        ("self_attn.q_proj.weight", 1.25),
        ("mlp.up_proj.weight", 0.75),
        ("self_attn.k_proj.weight", 1.0),
    ]:
        assert torch.equal(
            out[f"model.layers.1.{suffix}"],
            expect(src[f"model.layers.1.{suffix}"], scale, f32, f16),
        ), suffix
    assert out["lm_head.weight"].dtype == torch.float16
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "float16" and cfg["num_hidden_layers"] == 2


def test_seed_004_shape_loads_runs_and_recipe_rebuilds(
    models: dict[str, Path], tmp_path: Path
) -> None:
    """Repeated unscaled layers, sharded output, and the written recipe rebuilds every byte."""
    m = str(models["llama"])
    scaled = [{"filter": "o_proj", "value": 1.5}, {"filter": "down_proj", "value": 1.5}]
    config = {
        "merge_method": "passthrough",
        "dtype": "bfloat16",
        "slices": [
            {"sources": [{"model": m, "layer_range": [0, 3]}]},
            {"sources": [{"model": m, "layer_range": [1, 3]}]},  # repeated, unscaled
            {"sources": [{"model": m, "layer_range": [2, 4], "parameters": {"scale": scaled}}]},
        ],
    }
    out = merged(tmp_path, config, "--out-shard-size", "40KB")
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert torch.equal(
        out["model.layers.3.mlp.up_proj.weight"], out["model.layers.1.mlp.up_proj.weight"]
    )
    assert logits(tmp_path / "out", TOKENS).isfinite().all()

    recipe = tmp_path / "out" / "mergekit_config.yml"
    assert run_cli("merge", recipe, tmp_path / "rebuilt").exit_code == 0
    rebuilt = tensors(tmp_path / "rebuilt")
    assert rebuilt.keys() == out.keys()
    assert all(torch.equal(rebuilt[k], out[k]) for k in out)


def test_config_and_tokenizer_come_from_base_model(models: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(models["llama_b"], base)
    (base / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    config = {
        "merge_method": "passthrough",
        "base_model": str(base),
        "slices": [{"sources": [{"model": str(models["llama"]), "layer_range": [0, 4]}]}],
    }
    merged(tmp_path, config)
    assert (
        tmp_path / "out" / "tokenizer_config.json"
    ).read_text() == '{"chat_template": "{{ messages }}"}'
    assert (tmp_path / "out" / "generation_config.json").exists()


def test_sharded_source_dry_run_and_cast(models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(models["llama"]).save_pretrained(
        tmp_path / "sharded", max_shard_size="50KB"
    )
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    config = write_yaml(
        tmp_path / "c.yaml",
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": "sharded", "layer_range": [0, 2]}]}],
        },
    )
    result = run_cli("merge", config, tmp_path / "dry", "--dry-run")
    assert result.exit_code == 0 and "sharded" in result.output
    assert not (tmp_path / "dry").exists()
    assert run_cli("merge", config, tmp_path / "out", "--dtype", "float32").exit_code == 0
    out, src = tensors(tmp_path / "out"), tensors(models["llama"])
    assert torch.equal(
        out["model.layers.1.self_attn.v_proj.weight"],
        src["model.layers.1.self_attn.v_proj.weight"].float(),
    )


def test_hub_id_resolves_from_the_hub_cache(
    models: dict[str, Path], tmp_path: Path, offline_hub_cache: Path
) -> None:
    """A Hub id goes through snapshot_download; a model placed in the cache stands in offline."""
    cache_repo(offline_hub_cache, "acme/tiny", models["llama"])
    config = write_yaml(
        tmp_path / "c.yaml",
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": "acme/tiny", "layer_range": [0, 4]}]}],
        },
    )
    result = run_cli("merge", config, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert torch.equal(
        tensors(tmp_path / "out")["lm_head.weight"], tensors(models["llama"])["lm_head.weight"]
    )
    missing = write_yaml(
        tmp_path / "m.yaml",
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": "acme/absent", "layer_range": [0, 4]}]}],
        },
    )
    result = run_cli("merge", missing, tmp_path / "out2")
    assert result.exit_code == 2 and "acme/absent: not in the local Hub cache" in result.output


def test_recipe_pins_hub_donors_to_the_commit_read(
    models: dict[str, Path], tmp_path: Path, offline_hub_cache: Path
) -> None:
    """`mergekit_config.yml` names a Hub donor as `org/name@<commit>`, which rebuilds the model
    after the donor moves on: hubmerge reads it back, and so does mergekit's own config parser.
    """
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    repo = cache_repo(offline_hub_cache, "acme/tiny", models["llama"], sha).parents[1]
    Path("llama").symlink_to(models["llama_b"])
    config = write_yaml(
        tmp_path / "c.yaml",
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "acme/tiny", "layer_range": [0, 2]}]},
                {"sources": [{"model": "llama", "layer_range": [2, 4]}]},
            ],
            "base_model": "acme/tiny",
        },
    )
    assert run_cli("merge", config, tmp_path / "out").exit_code == 0
    recipe = yaml.safe_load((tmp_path / "out" / "mergekit_config.yml").read_text())
    assert recipe["base_model"] == f"acme/tiny@{sha}"
    assert [s["sources"][0]["model"] for s in recipe["slices"]] == [f"acme/tiny@{sha}", "llama"]

    # The main branch moves on; the pinned recipe still reads the commit it names.
    (repo / "refs" / "main").write_text("f" * 40)
    result = run_cli("merge", tmp_path / "out" / "mergekit_config.yml", tmp_path / "again")
    assert result.exit_code == 0, result.output
    first, again = tensors(tmp_path / "out"), tensors(tmp_path / "again")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)

    from mergekit.config import MergeConfiguration

    parsed = MergeConfiguration.model_validate(recipe)
    references = {m.model.path: m.model.revision for m in parsed.referenced_models()}
    assert references == {"acme/tiny": sha, "llama": None}


def test_pickle_checkpoints_need_opt_in(models: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(models["llama"]).save_pretrained(
        tmp_path / "pickled", safe_serialization=False
    )
    if not list((tmp_path / "pickled").glob("*.bin")):
        import torch as t

        state = AutoModelForCausalLM.from_pretrained(models["llama"]).state_dict()
        t.save(state, tmp_path / "pickled" / "pytorch_model.bin")
        for f in (tmp_path / "pickled").glob("*.safetensors"):
            os.remove(f)
    config = write_yaml(
        tmp_path / "c.yaml",
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": "pickled", "layer_range": [0, 4]}]}],
        },
    )
    result = run_cli("merge", config, tmp_path / "out")
    assert result.exit_code == 2 and "--allow-pickle" in result.output
    assert not (tmp_path / "out").exists()
    assert run_cli("merge", config, tmp_path / "out", "--allow-pickle").exit_code == 0
    assert torch.equal(
        tensors(tmp_path / "out")["model.norm.weight"],
        tensors(models["llama"])["model.norm.weight"],
    )
