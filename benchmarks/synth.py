"""Write a synthetic Llama checkpoint (random weights) straight to safetensors shards.

The benchmarks need a realistically *shaped* model (HF tensor names, a sharded layout with an
index, a ``config.json`` that ``transformers.LlamaConfig`` accepts) without downloading one:
the machines have no hub access. Weights are small-magnitude random values, so every tensor is
distinct and a merge that maps a layer to the wrong place is caught by a bitwise comparison.

Generation is per tensor and shard by shard, so peak memory stays around one shard plus one
float32 temporary, whatever the model size. A finished folder carries a marker file with the
parameters it was made from; calling again with the same parameters reuses it.

Usage::

    python benchmarks/synth.py OUT_DIR                       # ~2.4 GB bf16, 24 layers
    python benchmarks/synth.py OUT_DIR --layers 4 --hidden 256 --intermediate 512 --vocab 1000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

MARKER = ".synth-complete.json"

#: Sizes of the ``--small`` preset shared by the benchmarks (a few MB, seconds to merge).
SMALL: dict[str, int] = {
    "num_layers": 12,
    "hidden": 256,
    "intermediate": 512,
    "vocab": 1000,
    "num_heads": 4,
    "num_kv_heads": 2,
    "shards": 2,
}

_DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


def tensor_specs(
    num_layers: int, hidden: int, intermediate: int, vocab: int, num_heads: int, num_kv_heads: int
) -> list[tuple[str, tuple[int, ...]]]:
    """Return ``(name, shape)`` of every tensor in checkpoint order: embed, layers, norm, head."""
    head_dim = hidden // num_heads
    kv = num_kv_heads * head_dim
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(num_layers):
        p = f"model.layers.{i}."
        specs += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    specs += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return specs


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _split_shards(
    specs: list[tuple[str, tuple[int, ...]]], shards: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split tensors, in order, into ``shards`` contiguous groups of roughly equal byte size."""
    total = sum(_numel(s) for _, s in specs)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    done = 0
    for name, shape in specs:
        # Start a new shard once the running total passes the next equal-size boundary.
        if groups[-1] and len(groups) < shards and done >= total * len(groups) / shards:
            groups.append([])
        groups[-1].append((name, shape))
        done += _numel(shape)
    return [g for g in groups if g]


def _generate(
    group: list[tuple[str, tuple[int, ...]]], gen: torch.Generator, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield random tensors: norms ~ 1 + N(0, 0.02), matrices ~ N(0, 0.02)."""
    for name, shape in group:
        t = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02)
        if len(shape) == 1:
            t.add_(1.0)
        yield name, t.to(dtype)
        del t


def write_tokenizer(out: Path, vocab: int) -> None:
    """Write a tiny word-level ``tokenizer.json`` (+ config) that ``AutoTokenizer`` loads.

    Merge tools copy the base model's tokenizer into their output; without one mergekit spends
    time failing to build it, which would skew the timings. Tokens are ``<unk> <s> </s>``
    followed by ``t3 ... t{vocab-1}`` so the ids line up with the embedding rows.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    tokens = specials + [f"t{i}" for i in range(len(specials), vocab)]
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def llama_config(
    num_layers: int,
    hidden: int,
    intermediate: int,
    vocab: int,
    num_heads: int,
    num_kv_heads: int,
    dtype: str,
) -> dict[str, object]:
    """A ``config.json`` dict for ``LlamaForCausalLM`` with the given shapes (untied head)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": hidden // num_heads,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "max_position_embeddings": 4096,
        "mlp_bias": False,
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab,
    }


def make_synthetic_llama(
    out_dir: str | os.PathLike[str],
    num_layers: int = 24,
    hidden: int = 2048,
    intermediate: int = 5632,
    vocab: int = 32000,
    num_heads: int = 16,
    num_kv_heads: int = 4,
    shards: int = 3,
    dtype: str = "bfloat16",
    seed: int = 0,
    tokenizer: bool = True,
    verbose: bool = False,
) -> Path:
    """Write a random-weight Llama checkpoint to ``out_dir`` and return its path.

    The defaults give a TinyLlama-shaped model of about 2.4 GB in bfloat16, in ``shards``
    files ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``. If the
    folder already holds a complete model made with the same parameters (marker file), it is
    reused as is; an incomplete or different one is deleted and rewritten. With ``tokenizer``
    a small word-level tokenizer matching ``vocab`` is written too (see ``write_tokenizer``).
    """
    if hidden % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden must divide by num_heads, and num_heads by num_kv_heads")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}")
    out = Path(out_dir)
    params = {
        "num_layers": num_layers,
        "hidden": hidden,
        "intermediate": intermediate,
        "vocab": vocab,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "shards": shards,
        "dtype": dtype,
        "seed": seed,
        "tokenizer": tokenizer,
    }
    marker = out / MARKER
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                if verbose:
                    print(f"reusing synthetic model in {out}")
                return out
        except json.JSONDecodeError:
            pass
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    t0 = time.perf_counter()
    torch_dtype = _DTYPES[dtype]
    itemsize = torch.tensor([], dtype=torch_dtype).element_size()
    specs = tensor_specs(num_layers, hidden, intermediate, vocab, num_heads, num_kv_heads)
    groups = _split_shards(specs, shards)
    n = len(groups)
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total_size = 0
    for i, group in enumerate(groups, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        tensors = dict(_generate(group, gen, torch_dtype))
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = fname
            total_size += t.numel() * itemsize
        del tensors
        if verbose:
            print(f"  wrote {fname} ({len(group)} tensors)")

    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg = llama_config(num_layers, hidden, intermediate, vocab, num_heads, num_kv_heads, dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if tokenizer:
        write_tokenizer(out, vocab)
    marker.write_text(json.dumps(params) + "\n")  # written last: marks the folder complete
    if verbose:
        print(
            f"synthetic model: {total_size / 1e9:.2f} GB in {n} shards, "
            f"{time.perf_counter() - t0:.1f} s -> {out}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python benchmarks/synth.py OUT [--small | --layers N --hidden H ...]``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output folder")
    ap.add_argument("--small", action="store_true", help=f"tiny preset for quick checks {SMALL}")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-tokenizer", action="store_true", help="do not write a tokenizer")
    a = ap.parse_args(argv)
    kw: dict[str, int] = {
        "num_layers": a.layers,
        "hidden": a.hidden,
        "intermediate": a.intermediate,
        "vocab": a.vocab,
        "num_heads": a.heads,
        "num_kv_heads": a.kv_heads,
        "shards": a.shards,
    }
    if a.small:
        kw = dict(SMALL)
    make_synthetic_llama(
        a.out, dtype=a.dtype, seed=a.seed, tokenizer=not a.no_tokenizer, verbose=True, **kw
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
