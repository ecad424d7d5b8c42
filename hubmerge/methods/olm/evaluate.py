"""The working model OLM scores: loaded once, changed one layer at a time, evaluated fast.

Three things make a candidate cheap to score:

- Layer swaps copy one layer's tensors from the pool's safetensors into the loaded model; no
  model is ever reloaded or saved per candidate.
- Every dataset is tokenized once, into padded batches reused by every evaluation.
- At position p, everything below p is the same for all candidates, so the hidden states that
  enter layer p are computed once per position and teacher-forced scoring (bigram, and exact's
  tie-breaker) runs only layers p..L-1 for each candidate. Generation (exact, quality) still
  runs the whole model, batched with left padding and a KV cache.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hubmerge.datasets import Sample
from hubmerge.generation import build_prompts, eos_ids, greedy_decode
from hubmerge.methods.olm.scoring import (
    Score,
    bigram_score,
    exact_mismatch,
    quality_score,
)
from hubmerge.sources import ModelSource
from hubmerge.tensorfile import TensorInfo, read_tensor


@dataclass(frozen=True)
class Limits:
    """Generation limits per mode (see `OlmConfig.limits`)."""

    exact_max_new_tokens: int | None
    quality_max_new_tokens: int
    min_words: int
    target_words: int


@dataclass
class _Batch:
    """Left-padded token ids of a batch; the last `answer_lengths[i]` of row i are the answer."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    answer_lengths: list[int]


@dataclass
class Task:
    """One dataset, tokenized once: prompts for generation, prompt + answer for teacher forcing."""

    name: str
    mode: str
    references: list[str]
    prompt_batches: list[_Batch] = field(default_factory=list)
    forced_batches: list[_Batch] = field(default_factory=list)
    max_answer_tokens: int = 0


@dataclass
class Counters:
    """What evaluation cost so far (for the report and the benchmark)."""

    full_evaluations: int = 0
    prefix_evaluations: int = 0
    full_seconds: float = 0.0
    prefix_seconds: float = 0.0
    swaps: int = 0
    swap_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0


class _Captured(Exception):
    """Raised by the capture hook to stop a forward pass once layer p's input is known."""


class WorkingModel:
    """A causal LM on its device, scored on tokenized tasks and edited layer by layer."""

    def __init__(
        self,
        base: ModelSource,
        samples: dict[str, tuple[str, list[Sample]]],
        *,
        limits: Limits,
        batch_size: int,
        device: str,
        dtype: torch.dtype,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging

        logging.disable_progress_bar()  # hubmerge shows its own progress
        self.tokenizer = AutoTokenizer.from_pretrained(base.path)
        if device == "auto":
            # Larger than one device: accelerate spreads the layers over the GPUs and CPU memory;
            # a swap then copies the candidate to wherever its position lives.
            self.model = AutoModelForCausalLM.from_pretrained(
                base.path, dtype=dtype, device_map="auto"
            ).eval()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype).to(device)
            self.model.eval()
        self.device = self.model.get_input_embeddings().weight.device
        self.limits = limits
        self.counters = Counters()
        self._params = self.model.state_dict(keep_vars=True)
        self._eos = eos_ids(self.model, self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self._pad = pad if pad is not None else (self._eos[0] if self._eos else 0)
        self.tasks = [
            self._tokenize(name, mode, items, batch_size) for name, (mode, items) in samples.items()
        ]
        self._prefix: dict[int, list[torch.Tensor]] = {}
        self._prefix_start = 0

    # -- editing ------------------------------------------------------------------------------

    def load(self, tensors: dict[str, TensorInfo]) -> None:
        """Copy tensors (output name -> source bytes) into the model, in place."""
        start = time.perf_counter()
        with torch.no_grad():
            for name, info in tensors.items():
                self._params[name].copy_(read_tensor(info))  # casts to the param's dtype/device
        self.counters.swaps += 1
        self.counters.swap_seconds += time.perf_counter() - start

    def load_layer(self, position: int, source: ModelSource, layer: int) -> None:
        self.load({f"model.layers.{position}.{s}": t for s, t in source.layers[layer].items()})

    def load_model(self, source: ModelSource) -> None:
        """Make the working model `source` entirely (base selection evaluates each pool model)."""
        self.load(dict(source.tensors))
        self._prefix.clear()

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, start: int = 0) -> list[Score]:
        """Score every task. With `start` > 0, teacher-forced passes reuse the cached input of
        layer `start` (call `cache_prefix(start)` first; layers below it must not change)."""
        if start and start != self._prefix_start:
            raise ValueError(f"evaluate(start={start}) needs cache_prefix({start}) first")
        began = time.perf_counter()
        scores = [self._score(task, index, start) for index, task in enumerate(self.tasks)]
        spent = time.perf_counter() - began
        if start:
            self.counters.prefix_evaluations += 1
            self.counters.prefix_seconds += spent
        else:
            self.counters.full_evaluations += 1
            self.counters.full_seconds += spent
        return scores

    def cache_prefix(self, start: int) -> None:
        """Compute, once, the hidden states entering layer `start` for every forced batch."""
        self._prefix.clear()
        self._prefix_start = start
        if start == 0:
            return
        captured: list[torch.Tensor] = []

        def capture(_: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Captured

        handle = self.model.model.layers[start].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            for index, task in enumerate(self.tasks):
                first = len(captured)
                for batch in task.forced_batches:
                    with torch.inference_mode(), contextlib.suppress(_Captured):
                        self._forward(batch, keep=1)
                self._prefix[index] = captured[first:]
        finally:
            handle.remove()

    def _score(self, task: Task, index: int, start: int) -> Score:
        if task.mode == "bigram":
            per_sample = [bigram_score(ce) for ce in self._token_ce(task, index, start)]
            return Score(sum(per_sample) / len(per_sample))
        if task.mode == "exact":
            outputs = self._generate(task, task_max_new_tokens(task, self.limits))
            nll = [sum(ce) / len(ce) for ce in self._token_ce(task, index, start)]
            return Score(exact_mismatch(outputs, task.references), sum(nll) / len(nll))
        outputs = self._generate(task, self.limits.quality_max_new_tokens)
        per_sample = [
            quality_score(o, min_words=self.limits.min_words, target_words=self.limits.target_words)
            for o in outputs
        ]
        return Score(sum(per_sample) / len(per_sample))

    def _token_ce(self, task: Task, index: int, start: int) -> Iterator[list[float]]:
        """Per sample, the cross-entropy of each reference token given everything before it."""
        for batch_index, batch in enumerate(task.forced_batches):
            keep = max(batch.answer_lengths) + 1
            with torch.inference_mode(), self._from_layer(start, index, batch_index):
                logits = self._forward(batch, keep=keep)
            width = batch.input_ids.shape[1]
            for row, length in enumerate(batch.answer_lengths):
                # One row's answer positions at a time, in float32: with a 150k vocabulary a
                # whole batch's log-softmax would be gigabytes.
                targets = batch.input_ids[row, width - length :].unsqueeze(-1)
                predicted = logits[row, keep - length - 1 : keep - 1].float()
                ce = predicted.logsumexp(-1) - predicted.gather(-1, targets).squeeze(-1)
                yield ce.tolist()

    @contextlib.contextmanager
    def _from_layer(self, start: int, task_index: int, batch_index: int) -> Iterator[None]:
        """Run only layers start..L-1, feeding layer `start` its cached input."""
        if start == 0:
            yield
            return
        decoder = self.model.model
        layers = decoder.layers
        cached = self._prefix[task_index][batch_index]

        def feed(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (cached, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached}

        # The decoder picks each layer's attention mask by its index in `config.layer_types`:
        # slice that list with the layers, or a sliding layer would get a full mask (or back).
        config = decoder.config
        types = getattr(config, "layer_types", None)
        handle = layers[start].register_forward_pre_hook(feed, with_kwargs=True)
        decoder.layers = nn.ModuleList(list(layers)[start:])
        if types is not None:
            config.layer_types = types[start:]
        try:
            yield
        finally:
            decoder.layers = layers
            if types is not None:
                config.layer_types = types
            handle.remove()

    def _forward(self, batch: _Batch, *, keep: int) -> torch.Tensor:
        return self.model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=keep,
        ).logits

    def _generate(self, task: Task, max_new_tokens: int) -> list[str]:
        began = time.perf_counter()
        outputs: list[str] = []
        for batch in task.prompt_batches:
            rows = greedy_decode(
                self.model, batch.input_ids, batch.attention_mask, max_new_tokens, self._eos
            )
            self.counters.generated_tokens += sum(len(row) for row in rows)
            outputs += [self.tokenizer.decode(row, skip_special_tokens=True) for row in rows]
        self.counters.generation_seconds += time.perf_counter() - began
        return outputs

    # -- tokenization (once per dataset) --------------------------------------------------------

    def _tokenize(self, name: str, mode: str, samples: list[Sample], batch_size: int) -> Task:
        prompts = build_prompts(self.tokenizer, samples)
        prompt_ids = [self._encode(p) for p in prompts]
        answer_ids = [self._encode(s.reference) for s in samples]
        task = Task(name, mode, [s.reference for s in samples])
        task.max_answer_tokens = max(len(a) for a in answer_ids)
        for begin in range(0, len(samples), batch_size):
            chunk = slice(begin, begin + batch_size)
            if mode != "bigram":
                task.prompt_batches.append(self._pad_left(prompt_ids[chunk], [0] * len(prompts)))
            if mode != "quality":
                pairs = list(zip(prompt_ids[chunk], answer_ids[chunk], strict=True))
                task.forced_batches.append(
                    self._pad_left([p + a for p, a in pairs], [len(a) for _, a in pairs])
                )
        return task

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _pad_left(self, rows: Sequence[list[int]], answer_lengths: list[int]) -> _Batch:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        # Positions count real tokens only, so a left-padded row computes what it would alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return _Batch(
            ids.to(self.device),
            mask.to(self.device),
            positions.to(self.device),
            answer_lengths[: len(rows)],
        )


def task_max_new_tokens(task: Task, limits: Limits) -> int:
    """exact mode generates at most the longest reference plus a margin, unless configured."""
    return limits.exact_max_new_tokens or task.max_answer_tokens + 4
