"""The shipped model zoo: Hub-style folders that load and chat, trained as the manifest says.

Also covers `hubmerge.answers` on real models (left padding, eos handling, fallback prompt),
since the zoo is the only model this test suite has.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hubmerge import zoo
from hubmerge.answers import build_prompts, exact_match_accuracy, greedy_generate
from hubmerge.datasets import Sample, load_conversations
from hubmerge.errors import SourceError
from hubmerge.zoo import train

MANIFEST = json.loads(zoo.MANIFEST_PATH.read_text(encoding="utf-8"))
EVALUATION = MANIFEST["evaluation"]
SPECIALISATIONS = {"tiny-add": "add", "tiny-reverse": "reverse", "tiny-sort": "sort"}
# Points of held-out exact match a fine-tune must gain on its own task over the base.
MIN_GAIN = 0.2
# With replay, a fine-tune stays decent elsewhere: at most this far below the base on any task.
MAX_FORGETTING = 0.06

Loaded = dict[str, tuple[Any, Any]]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run on one thread, as the zoo was trained and measured.

    These models are so small that a second thread barely helps, and it stalls every op
    (10x slower) while the other core is busy.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(train.THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded() -> Loaded:
    """Every zoo model and its tokenizer, loaded the way a user loads a Hub model."""
    return {
        name: (
            AutoModelForCausalLM.from_pretrained(zoo.model_path(name)),
            AutoTokenizer.from_pretrained(zoo.model_path(name)),
        )
        for name in zoo.MODELS
    }


@pytest.fixture(scope="module")
def heldout() -> dict[str, list[Sample]]:
    return {task: load_conversations(zoo.dataset_path(task, "heldout")) for task in zoo.TASKS}


@pytest.fixture(scope="module")
def measured(loaded: Loaded, heldout: dict[str, list[Sample]]) -> dict[str, dict[str, float]]:
    """Fresh held-out accuracy of every family model on every task, as the manifest measured."""
    return {
        name: {
            task: exact_match_accuracy(
                *loaded[name], samples, EVALUATION["max_new_tokens"], EVALUATION["batch_size"]
            )
            for task, samples in heldout.items()
        }
        for name in zoo.FAMILY
    }


def test_every_model_is_a_qwen2_that_runs(loaded: Loaded) -> None:
    for name, (model, tokenizer) in loaded.items():
        config = model.config
        assert config.model_type == "qwen2", name
        assert config.layer_types == ["full_attention"] * config.num_hidden_layers, name
        assert model.model.layers[0].self_attn.q_proj.bias is not None, name
        assert model.dtype == torch.float32, name
        ids = tokenizer("add 1+2", return_tensors="pt").input_ids
        with torch.inference_mode():
            logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], config.vocab_size), name
        assert torch.isfinite(logits).all(), name


def test_family_shares_architecture_and_incompatible_does_not(loaded: Loaded) -> None:
    base = loaded[zoo.BASE][0].config
    for name in zoo.FINE_TUNES:
        config = loaded[name][0].config
        assert config.to_dict() | {"_name_or_path": ""} == base.to_dict() | {"_name_or_path": ""}
    incompatible = loaded[zoo.INCOMPATIBLE][0].config
    assert incompatible.hidden_size != base.hidden_size
    assert incompatible.vocab_size == base.vocab_size
    assert base.tie_word_embeddings


def test_chat_template_renders_chatml(loaded: Loaded) -> None:
    model, tokenizer = loaded[zoo.BASE]
    messages = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "add 1+2"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nBe exact.<|im_end|>\n"
        "<|im_start|>user\nadd 1+2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    ids = encoded["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.eos_token_id in model.generation_config.eos_token_id


def test_one_token_per_character_and_exact_decode(loaded: Loaded) -> None:
    tokenizer = loaded[zoo.BASE][1]
    text = "The cat sees 12 + 30 = 42!\n  two  spaces, tab\tand 'quotes'.\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


def test_training_tokenizer_matches_loaded_tokenizer(loaded: Loaded) -> None:
    """The ids the models were trained on are the ids transformers produces when loading."""
    tokenizer = loaded[zoo.BASE][1]
    built = train.build_tokenizer()
    texts = [train.chat_prefix("sort dcba") + "abcd<|im_end|>", "A dog likes the red hat.", "é ü"]
    for text in texts:
        assert built.encode(text).ids == tokenizer(text, add_special_tokens=False).input_ids


def test_fine_tunes_beat_base_on_their_task(measured: dict[str, dict[str, float]]) -> None:
    for name, task in SPECIALISATIONS.items():
        assert measured[name][task] >= measured[zoo.BASE][task] + MIN_GAIN, (name, measured)


def test_each_fine_tune_is_best_at_its_task_and_keeps_the_others(
    measured: dict[str, dict[str, float]],
) -> None:
    """Like real fine-tunes trained with replay: the family's best at their own task, and
    close to the base (or better) on every other one, so no fine-tune is the best at all."""
    for name, own in SPECIALISATIONS.items():
        assert measured[name][own] == max(measured[m][own] for m in zoo.FAMILY), (name, measured)
        for task in zoo.TASKS:
            assert measured[name][task] >= measured[zoo.BASE][task] - MAX_FORGETTING, (name, task)
    composite = {m: sum(measured[m].values()) / len(zoo.TASKS) for m in zoo.FAMILY}
    for name in zoo.FINE_TUNES:
        assert composite[name] > composite[zoo.BASE]
        others = [t for t in zoo.TASKS if t != SPECIALISATIONS[name]]
        assert any(measured[name][t] < max(measured[m][t] for m in zoo.FAMILY) for t in others)


def test_manifest_records_the_replay_recipe() -> None:
    for name, task in SPECIALISATIONS.items():
        entry = MANIFEST["models"][name]
        assert entry["replay"] == train.REPLAY and 0.3 <= entry["replay"] <= 0.5
        assert entry["mixture"] == train.with_replay(task)
        assert entry["mixture"][task] > 1 - train.REPLAY
        assert set(entry["mixture"]) == set(MANIFEST["models"][zoo.BASE]["mixture"])
        assert sum(entry["mixture"].values()) == pytest.approx(1.0)


def test_manifest_accuracy_matches_fresh_measurement(
    measured: dict[str, dict[str, float]],
) -> None:
    for model in zoo.list_models():
        if model.name in measured:
            assert model.accuracy == pytest.approx(measured[model.name]), model.name


def test_list_models_reads_manifest() -> None:
    models = zoo.list_models()
    assert [m.name for m in models] == list(zoo.MODELS)
    for model in models:
        assert model.path == zoo.model_path(model.name)
        assert (model.path / "model.safetensors").is_file()
        assert set(model.accuracy) == set(zoo.TASKS)
        assert model.description
        assert model.parent == (zoo.BASE if model.name in zoo.FINE_TUNES else None)


def test_unknown_names_raise_source_error() -> None:
    with pytest.raises(SourceError, match=r"^unknown zoo model 'tiny-huge' \(known: tiny-base"):
        zoo.model_path("tiny-huge")
    with pytest.raises(SourceError, match=r"^unknown zoo task 'divide'"):
        zoo.dataset_path("divide", "heldout")
    with pytest.raises(
        SourceError, match=r"^unknown zoo split 'train' \(known: selection, validation, heldout"
    ):
        zoo.dataset_path("add", "train")


def test_shipped_datasets_are_disjoint_and_sized() -> None:
    assert tuple(train.SPLIT_SIZES) == zoo.SPLITS and MANIFEST["splits"] == train.SPLIT_SIZES
    # One selection prompt is under a point: no single prompt decides a merge.
    assert train.SPLIT_SIZES["selection"] >= 128
    for task in zoo.TASKS:
        prompts = []
        for split, size in train.SPLIT_SIZES.items():
            samples = load_conversations(zoo.dataset_path(task, split))
            assert len(samples) == size, (task, split)
            prompts += [s.messages[0]["content"] for s in samples]
        assert len(set(prompts)) == len(prompts), task


def test_shipped_datasets_are_reproducible(tmp_path: Path) -> None:
    held = train.write_datasets(tmp_path)
    for task in zoo.TASKS:
        for split in zoo.SPLITS:
            shipped = zoo.dataset_path(task, split)
            assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes()
        assert len(held[task]) == sum(train.SPLIT_SIZES.values())


def test_training_is_deterministic() -> None:
    """Two short runs from the same seed give bit-identical weights."""
    tokenizer = train.build_tokenizer()
    recipe = train.Recipe("t", "t", None, {"add": 0.5, "text": 0.5}, steps=3, lr=1e-3)
    weights = []
    for _ in range(2):
        torch.manual_seed(recipe.seed)
        model = train.new_model(tokenizer, train.INCOMPATIBLE_ARCHITECTURE)
        train.train(model, train.Sampler(tokenizer, recipe, {"add": set()}), recipe)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_shipped_weights_are_small() -> None:
    total = sum(p.stat().st_size for p in (zoo.ZOO_DIR / "models").rglob("*") if p.is_file())
    assert total <= 8 * 1024 * 1024


def test_left_padded_batches_match_single_prompts(
    loaded: Loaded, heldout: dict[str, list[Sample]]
) -> None:
    """Prompts of different lengths share a batch without changing any answer."""
    model, tokenizer = loaded[zoo.BASE]
    samples = [s for task in zoo.TASKS for s in heldout[task][:4]]
    prompts = build_prompts(tokenizer, samples)
    assert len({len(p) for p in prompts}) > 1
    batched = greedy_generate(model, tokenizer, prompts, 16, batch_size=len(prompts))
    single = greedy_generate(model, tokenizer, prompts, 16, batch_size=1)
    assert batched == single


def test_generation_returns_only_the_answer(loaded: Loaded) -> None:
    model, tokenizer = loaded["tiny-reverse"]
    sample = Sample(messages=({"role": "user", "content": "reverse abcdef"},), reference="fedcba")
    (answer,) = greedy_generate(model, tokenizer, build_prompts(tokenizer, [sample]), 16)
    assert answer == "fedcba"


def test_prompts_without_chat_template_fall_back_with_warning(loaded: Loaded) -> None:
    tokenizer = copy.deepcopy(loaded[zoo.BASE][1])
    tokenizer.chat_template = None
    sample = Sample(
        messages=({"role": "system", "content": "S"}, {"role": "user", "content": "U"}),
        reference="A",
    )
    with pytest.warns(UserWarning, match="no chat template"):
        assert build_prompts(tokenizer, [sample]) == ["System: S\nUser: U\nAssistant:"]


def test_exact_match_needs_samples(loaded: Loaded) -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        exact_match_accuracy(*loaded[zoo.BASE], [], 4)
