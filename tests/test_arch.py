"""Every spec in `arch.SPECS` agrees with the model transformers builds for that architecture."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config, Qwen3Config

from hubmerge import arch, zoo
from hubmerge.sources import SUPPORT_PATTERNS
from tests.tinymodels import CONFIGS

KINDS = sorted(CONFIGS)


def _model(kind: str, **overrides: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[kind](**{"num_hidden_layers": 2} | overrides))
    with torch.no_grad():  # default inits leave norms at 1 and biases at 0
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def test_every_spec_has_a_tiny_model() -> None:
    """Each supported architecture is built by `tests/tinymodels.py`, so the tests here (and
    block expansion's function-preserving test) cover all of them."""
    built = {type(_model(kind)).__name__ for kind in KINDS}
    assert built == arch.SUPPORTED


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_spec_names_the_saved_tensors(kind: str, tie: bool, tmp_path: Path) -> None:
    """The names `save_pretrained` writes are the spec's: blocks under the layer prefix, the
    embeddings as the only pre-weights, the final norm, and `lm_head` only when not tied."""
    _model(kind, tie_word_embeddings=tie).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    arch.check_config(config, "saved")
    spec = arch.spec(config, "saved")
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())

    assert spec.ties(config) is tie
    edges = {spec.embed, spec.final_norm} | (set() if tie else {spec.lm_head})
    assert {n for n in names if not n.startswith(spec.layer_prefix)} == edges
    assert {n for n in names if spec.is_pre_weight(n)} == {spec.embed}
    layers: dict[int, set[str]] = {0: set(), 1: set()}
    for name in names - edges:
        parsed = spec.split_layer_name(name)
        assert parsed is not None, name
        layers[parsed[0]].add(parsed[1])
        assert spec.layer_name(*parsed) == name
    assert layers[0] and layers[0] == layers[1]


@pytest.mark.parametrize("kind", KINDS)
def test_tie_default_is_transformers(kind: str) -> None:
    """A config that does not say whether embeddings are tied means what transformers' default
    for the architecture says."""
    config = CONFIGS[kind]().to_dict()
    config.pop("tie_word_embeddings")
    default = type(CONFIGS[kind]())().tie_word_embeddings
    spec = arch.SPECS[type(_model(kind)).__name__]
    assert spec.ties(config) is default


@pytest.mark.parametrize("kind", KINDS)
def test_zeroed_residual_outputs_make_a_block_an_identity(kind: str) -> None:
    """Zeroing the spec's residual-output modules (weights and biases, matched as block
    expansion's `zero:` matches them) makes the block pass its input on unchanged."""
    model = _model(kind).eval()
    spec = arch.SPECS[type(model).__name__]
    blocks = model.model.layers
    modules = {name.rsplit(".", 1)[-1] for name, _ in blocks[0].named_modules()}
    assert set(spec.residual_outputs) <= modules
    with torch.no_grad():
        for name, param in blocks[0].named_parameters():
            if any(z in name for z in spec.residual_outputs):
                param.zero_()

    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(index: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            given = args[0] if args else kwargs["hidden_states"]
            seen[index] = (given, output[0] if isinstance(output, tuple) else output)

        return hook

    for index, block in enumerate(blocks):
        block.register_forward_hook(record(index), with_kwargs=True)
    with torch.no_grad():
        model(torch.arange(12).reshape(1, 12))
    assert torch.equal(seen[0][1], seen[0][0])
    assert not torch.allclose(seen[1][1], seen[1][0])  # an untouched block does change it


@pytest.mark.parametrize("kind", KINDS)
def test_per_layer_keys_are_transformers(kind: str) -> None:
    """Every config key transformers gives one value per layer is a spec layer key, and the
    sliding-window boundary key is the spec's."""
    config = CONFIGS[kind](num_hidden_layers=3).to_dict()
    spec = arch.SPECS[type(_model(kind)).__name__]
    per_layer = {k for k, v in config.items() if isinstance(v, list) and len(v) == 3}
    assert per_layer <= {key.name for key in spec.layer_keys}
    assert ("max_window_layers" in config) == (spec.first_sliding_key == "max_window_layers")


@pytest.mark.parametrize("config_class", [Qwen2Config, Qwen3Config])
def test_rewritten_window_boundary_is_what_transformers_derives(config_class: type) -> None:
    """Qwen slides from `max_window_layers` on: after a layer is repeated, the rewritten
    boundary gives transformers the same layer types as the rewritten list."""
    donor = config_class(
        num_hidden_layers=4, use_sliding_window=True, sliding_window=16, max_window_layers=2
    ).to_dict() | {"architectures": [config_class.__name__.replace("Config", "ForCausalLM")]}
    assert donor["layer_types"] == ["full_attention"] * 2 + ["sliding_attention"] * 2
    out = arch.rewrite_config(donor, [(donor, i) for i in (0, 1, 1, 2, 3)], "bfloat16")

    assert out["layer_types"] == ["full_attention"] * 3 + ["sliding_attention"] * 2
    assert out["max_window_layers"] == 3
    without_list = {k: v for k, v in out.items() if k != "layer_types"}
    assert config_class.from_dict(without_list).layer_types == out["layer_types"]
    assert config_class.from_dict(out).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "config",
    [{"torch_dtype": "bfloat16"}, {"dtype": "float16", "torch_dtype": "bfloat16"}, {}],
)
def test_config_dtype_reads_what_transformers_reads(config: dict[str, str]) -> None:
    want = LlamaConfig.from_dict(config | {"vocab_size": 8}).dtype
    got = arch.config_dtype(config)
    assert (got and getattr(torch, got)) == want
    assert arch.config_dtype({"dtype": ["bfloat16"]}) is None  # untrusted: not a name


def test_tokenizer_files_are_what_transformers_saves(tmp_path: Path) -> None:
    """A tokenizer with a chat template saves only files of `TOKENIZER_FILES`, and a Hub
    download (`SUPPORT_PATTERNS`) fetches every one of them."""
    tokenizer = AutoTokenizer.from_pretrained(zoo.model_path("tiny-base"))
    assert tokenizer.chat_template
    tokenizer.save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.iterdir()}
    assert saved and saved <= set(arch.TOKENIZER_FILES)
    assert saved & set(arch.CHAT_TEMPLATE_FILES) or "chat_template" in json.loads(
        (tmp_path / "tokenizer_config.json").read_text()
    )
    assert set(arch.CHAT_TEMPLATE_FILES) | arch.VOCABULARY_FILES <= set(arch.TOKENIZER_FILES)
    for name in arch.TOKENIZER_FILES:
        assert any(fnmatch.fnmatch(name, p) for p in SUPPORT_PATTERNS), name
