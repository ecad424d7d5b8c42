"""The working model OLM scores: loaded once, changed one layer at a time, evaluated fast.

What makes a candidate cheap to score:

- Layer swaps copy one layer's tensors from the pool's safetensors into the loaded model; no
  model is ever reloaded or saved per candidate.
- Every dataset is tokenized once, into padded batches reused by every evaluation.
- At position p, everything below p is the same for all candidates, so the hidden states that
  enter layer p, and for prompts the KV cache of layers below p, are computed once per position.
  Teacher-forced scoring (bigram, and exact's tie-breaker) then runs only layers p..L-1 for each
  candidate, and so does the prompt pass of generation (exact, quality). A candidate computes
  exactly what a whole-model pass computes (same operations on the same shapes), so its scores
  are bitwise those of a full evaluation.
- Generated tokens (batched, left padding, KV cache, one token at a time) are shared too: every
  generation that runs all layers records its trajectory per batch (each step's tokens, the
  hidden states entering every layer, the KV cache). A later candidate at position p, while the
  layers below p are unchanged since, follows it: at a step where every row still open has
  generated exactly the trajectory's tokens so far, layers below p would compute bitwise what
  they computed then, so only layers p..L-1 run, fed the recorded input of layer p. The first
  row that leaves the trajectory makes the batch run every layer again (from the trajectory's
  KV cache, which is that row's own up to there) until that row finishes. A finished row's
  later tokens are never read, and rows never mix (per-row arithmetic, same shapes), so it
  need not follow. Most candidates answer like the model they change, so most steps follow.
- In exact mode a row stops as soon as its answer has certainly missed the reference
  (`answers.early_miss`, mostly at its first token); its score is known, and it no longer
  holds its batch on the trajectory either.
- Those per-position caches are built from the nearest still-valid layer below, not from the
  embeddings: in `forward` order position p costs one layer (p - 1, just decided), in
  `backward` order the layers below never change and the inputs kept at every layer (beyond
  `KEEP_EVERY_INPUT_BYTES`, every sqrt(L)-th) bound the work and the memory; a whole-model
  pass keeps what it computes of them, so `backward` order's first position computes none.
  Each cached tensor remembers when it was computed, and a swap below it makes it stale.
- A pass over whole prompts runs the last layer's MLP only at the positions whose logits are
  read (`_last_mlp_at`), in whole-model and candidate passes alike.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hubmerge import arch
from hubmerge.answers import Settled, Step, build_prompts, early_miss, eos_ids, greedy_decode
from hubmerge.datasets import Sample
from hubmerge.methods.olm.scoring import (
    Score,
    bigram_score,
    exact_mismatch,
    exact_misses,
    quality_score,
)
from hubmerge.sources import ModelSource
from hubmerge.tensorfile import TensorInfo, read_tensor

#: The per-position caches keep the hidden states entering every layer while all of them take
#: at most this much memory: in `backward` order no position then recomputes a layer below it.
KEEP_EVERY_INPUT_BYTES = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Generation limits per mode (see `OlmConfig.limits`)."""

    exact_max_new_tokens: int | None
    quality_max_new_tokens: int
    min_words: int
    target_words: int


@dataclass
class _Prefix:
    """What the layers below a position computed for one batch, kept for the candidates there.

    `inputs[k]` is the hidden state entering layer k, `kv[j]` layer j's KV-cache entry (prompt
    batches only), each with the clock value at which it was computed.
    """

    inputs: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)
    kv: dict[int, tuple[int, Any]] = field(default_factory=dict)


@dataclass
class _Trajectory:
    """One batch's greedy generation through every layer, recorded at clock value `clock`.

    Step i fed `tokens[i]` (one id per row); `inputs[i][k]` is the hidden state that entered
    layer k then. The KV cache before step i is `cache` (after the last step) cut to
    `width + i` positions, or, for a sliding-window layer (which drops old entries),
    `sliding[i][layer]`, a copy kept before the step.
    """

    clock: int
    width: int
    tokens: list[torch.Tensor] = field(default_factory=list)
    inputs: list[list[torch.Tensor]] = field(default_factory=list)
    sliding: list[dict[int, Any]] = field(default_factory=list)
    cache: Any = None

    def layer_before(self, layer: int, step: int) -> Any:
        """Layer `layer`'s KV-cache entry as it was before step `step` (a copy to update), up
        to the step after the last: a row that followed to the end may still be open (its
        next token comes from other layers above)."""
        if step < len(self.sliding) and layer in self.sliding[step]:
            return copy.copy(self.sliding[step][layer])
        entry = copy.copy(self.cache.layers[layer])
        entry.keys = entry.keys[..., : self.width + step, :]
        entry.values = entry.values[..., : self.width + step, :]
        return entry


@dataclass
class _Batch:
    """Left-padded token ids of a batch; the last `answer_lengths[i]` of row i are the answer."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    answer_lengths: list[int]
    prefix: _Prefix = field(default_factory=_Prefix)
    trajectory: _Trajectory | None = None


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
    #: Building the per-position caches (`cache_prefix`) that prefix evaluations start from.
    cache_seconds: float = 0.0
    swaps: int = 0
    swap_seconds: float = 0.0
    generated_tokens: int = 0
    generation_seconds: float = 0.0
    #: Decoding steps that followed a recorded trajectory (ran only layers p..L-1).
    trajectory_steps: int = 0


class _Captured(Exception):
    """Raised by the capture hook to stop a forward pass once layer p's input is known."""


_LAYER_PARAM = re.compile(r"model\.layers\.(\d+)\.")


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
            self.model = AutoModelForCausalLM.from_pretrained(base.path, dtype=dtype)
            self.model.to(torch.device(device)).eval()
        self.device = self.model.get_input_embeddings().weight.device
        self.limits = limits
        self.counters = Counters()
        self._params = self.model.state_dict(keep_vars=True)
        self._eos = eos_ids(self.model, self.tokenizer)
        self._early_miss = early_miss(self.tokenizer)
        pad = self.tokenizer.pad_token_id
        self._pad = pad if pad is not None else (self._eos[0] if self._eos else 0)
        self.tasks = [
            self._tokenize(name, mode, items, batch_size) for name, (mode, items) in samples.items()
        ]
        depth = len(self.model.model.layers)
        # A logical clock: `_changed[i]` is when layer i last changed; a cached tensor computed
        # at clock c from layers below k is valid while none of them changed after c.
        self._clock = 0
        self._changed = [0] * depth
        #: Inputs are kept at every `_stride`-th layer (and near the current position): every
        #: layer's when they fit `KEEP_EVERY_INPUT_BYTES`, else every sqrt(L)-th.
        tokens = sum(
            b.input_ids.numel() for t in self.tasks for b in t.forced_batches + t.prompt_batches
        )
        width = self.model.get_input_embeddings().embedding_dim * dtype.itemsize
        fits = tokens * width * depth <= KEEP_EVERY_INPUT_BYTES
        self._stride = 1 if fits else max(1, math.isqrt(depth))
        self._start = 0

    # -- editing ------------------------------------------------------------------------------

    def load(self, tensors: Mapping[str, TensorInfo | Callable[[], torch.Tensor]]) -> None:
        """Copy tensors (output name -> source bytes, or a function computing the tensor, as
        for a blended candidate) into the model, in place."""
        start = time.perf_counter()
        self._clock += 1
        everything = False
        with torch.no_grad():
            for name, info in tensors.items():
                value = read_tensor(info) if isinstance(info, TensorInfo) else info()
                self._store(name, value)
                match = _LAYER_PARAM.match(name)
                if match:
                    self._changed[int(match[1])] = self._clock
                else:  # embeddings (or a tied head): every layer's input changes
                    everything = True
        if everything:
            self._changed = [self._clock] * len(self._changed)
            self._drop_prefixes()
        self.counters.swaps += 1
        self.counters.swap_seconds += time.perf_counter() - start

    def _store(self, name: str, value: torch.Tensor) -> None:
        """Put one tensor where the model reads it: into the parameter, on its device (cast to
        its dtype), or, for a layer accelerate offloaded (`device: auto` beyond the devices'
        memory; the parameter is then a placeholder on `meta`), into the offloaded weights
        the layer loads before each forward pass, held in CPU memory."""
        param = self._params[name]
        if param.device.type != "meta":
            param.copy_(value)
            return
        owner, _, leaf = name.rpartition(".")
        hook = getattr(self.model.get_submodule(owner), "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        if weights is None:
            raise RuntimeError(f"{name} is on the meta device but not offloaded by accelerate")
        # A `PrefixedDataset` over the offloaded weights; their `state_dict` takes priority
        # over the files (the source models', which are never written).
        stored = weights.dataset
        target = getattr(stored, "state_dict", stored)
        target[weights.prefix + leaf] = value.to("cpu", param.dtype, copy=True)

    def load_layer(self, position: int, source: ModelSource, layer: int) -> None:
        self.load({arch.layer_name(position, s): t for s, t in source.layers[layer].items()})

    def load_model(self, source: ModelSource) -> None:
        """Make the working model `source` entirely (base selection evaluates each pool model)."""
        self.load(dict(source.tensors))

    # -- evaluation ---------------------------------------------------------------------------

    def evaluate(self, start: int = 0) -> list[Score]:
        """Score every task. With `start` > 0, every pass starts at layer `start` from the
        per-position cache (call `cache_prefix(start)` first; layers below it must not change)."""
        if start and (start != self._start or not self._prefix_ready(start)):
            raise ValueError(f"evaluate(start={start}) needs cache_prefix({start}) first")
        began = time.perf_counter()
        scores = [self._score(task, start) for task in self.tasks]
        spent = time.perf_counter() - began
        if start:
            self.counters.prefix_evaluations += 1
            self.counters.prefix_seconds += spent
        else:
            self.counters.full_evaluations += 1
            self.counters.full_seconds += spent
        return scores

    def cache_prefix(self, start: int) -> None:
        """Make sure every batch has the hidden states entering layer `start` and, for prompts
        (generation), the KV cache of the layers below it: what every candidate at `start`
        shares."""
        began = time.perf_counter()
        self._start = start
        if start:
            for task in self.tasks:
                for batch in task.forced_batches:
                    self._advance(batch, start, kv=False)
                for batch in task.prompt_batches:
                    self._advance(batch, start, kv=True)
        self.counters.cache_seconds += time.perf_counter() - began

    def _below(self, layer: int) -> int:
        """When any layer below `layer` last changed."""
        return max(self._changed[:layer], default=0)

    def _valid_input(self, prefix: _Prefix, layer: int) -> bool:
        return layer in prefix.inputs and prefix.inputs[layer][0] >= self._below(layer)

    def _valid_kv(self, prefix: _Prefix, below: int) -> bool:
        """Whether the KV entries of layers 0..below-1 are all there and current."""
        return all(j in prefix.kv and prefix.kv[j][0] >= self._below(j + 1) for j in range(below))

    def _prefix_ready(self, start: int) -> bool:
        forced = [b.prefix for task in self.tasks for b in task.forced_batches]
        prompts = [b.prefix for task in self.tasks for b in task.prompt_batches]
        return all(self._valid_input(p, start) for p in forced + prompts) and all(
            self._valid_kv(p, start) for p in prompts
        )

    def _advance(self, batch: _Batch, stop: int, *, kv: bool) -> None:
        """Compute the input of layer `stop` from the highest valid cached input below it."""
        prefix = batch.prefix
        usable = [
            k
            for k in range(1, stop + 1)
            if self._valid_input(prefix, k) and (not kv or self._valid_kv(prefix, k))
        ]
        begin = max(usable, default=0)
        if begin < stop:
            self._run_prefix(batch, begin, stop, kv=kv)
        # Nothing above `stop`, nothing stale.
        prefix.inputs = {
            k: v
            for k, v in prefix.inputs.items()
            if k <= stop and self._kept(k, stop, begin) and self._valid_input(prefix, k)
        }
        prefix.kv = {j: v for j, v in prefix.kv.items() if j < stop}

    def _kept(self, layer: int, stop: int, begin: int = 0) -> bool:
        """Whether the input of `layer` is kept once the caches reach `stop` (computed from
        `begin`): what later positions may start from, in either order, at bounded memory.
        Every `_stride`-th input, and the last `_stride` below `stop` (backward order needs
        them next, forward order the one at `stop`)."""
        return layer % self._stride == 0 or layer >= max(begin, stop - self._stride)

    def _run_prefix(self, batch: _Batch, begin: int, stop: int, *, kv: bool) -> None:
        """Run layers begin..stop-1, keeping each one's input (and KV entry, with `kv`)."""
        prefix = batch.prefix
        cache = self._new_cache() if kv else None
        fed = prefix.inputs[begin][1] if begin else None
        # The layers are restored (leaving `_from_layer`) before the stop is swallowed.
        with (
            torch.inference_mode(),
            contextlib.suppress(_Captured),
            self._keeping_inputs(prefix, range(begin + 1, stop + 1), stop=stop),
            self._from_layer(begin, fed),
        ):
            self._forward(batch, keep=1, cache=cache)
        if cache is not None:
            self._keep_kv(prefix, cache, range(begin, stop))

    @contextlib.contextmanager
    def _keeping_inputs(
        self, prefix: _Prefix, layers: Iterable[int], *, stop: int | None = None
    ) -> Iterator[None]:
        """Keep in `prefix` the hidden state entering each of `layers` during the passes
        inside, and end the pass (raise `_Captured`) on reaching layer `stop`."""
        clock = self._clock

        def capture(layer: int) -> Any:
            def hook(_: nn.Module, args: tuple, kwargs: dict) -> None:
                prefix.inputs[layer] = (clock, args[0] if args else kwargs["hidden_states"])
                if layer == stop:
                    raise _Captured

            return hook

        decoder_layers = self.model.model.layers
        handles = [
            decoder_layers[k].register_forward_pre_hook(capture(k), with_kwargs=True)
            for k in layers
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _keep_kv(self, prefix: _Prefix, cache: Any, layers: Iterable[int]) -> None:
        """Keep those layers' KV-cache entries of a prompt pass (copies: decoding grows them)."""
        for j in layers:
            prefix.kv[j] = (self._clock, copy.copy(cache.layers[j]))

    def _whole_pass_keeps(
        self, prefix: _Prefix, start: int
    ) -> contextlib.AbstractContextManager[None]:
        """What a whole-model pass (`start` 0) keeps of what it computes anyway: the inputs
        the per-position caches keep (`_advance`) at the last position, where `backward` order
        starts, so that its first `cache_prefix` computes nothing."""
        if start:
            return contextlib.nullcontext()
        last = len(self.model.model.layers) - 1
        return self._keeping_inputs(prefix, [k for k in range(1, last + 1) if self._kept(k, last)])

    def _drop_prefixes(self) -> None:
        for task in self.tasks:
            for batch in task.forced_batches + task.prompt_batches:
                batch.prefix = _Prefix()
                batch.trajectory = None

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _score(self, task: Task, start: int) -> Score:
        if task.mode == "bigram":
            per_sample = [bigram_score(ce) for ce in self._token_ce(task, start)]
            return Score(sum(per_sample) / len(per_sample), per_sample=tuple(per_sample))
        if task.mode == "exact":
            outputs = self._generate(task, task_max_new_tokens(task, self.limits), start)
            nll = [sum(ce) / len(ce) for ce in self._token_ce(task, start)]
            return Score(
                exact_mismatch(outputs, task.references),
                sum(nll) / len(nll),
                exact_misses(outputs, task.references),
            )
        outputs = self._generate(task, self.limits.quality_max_new_tokens, start)
        per_sample = [
            quality_score(o, min_words=self.limits.min_words, target_words=self.limits.target_words)
            for o in outputs
        ]
        return Score(sum(per_sample) / len(per_sample), per_sample=tuple(per_sample))

    def _token_ce(self, task: Task, start: int) -> Iterator[list[float]]:
        """Per sample, the cross-entropy of each reference token given everything before it."""
        for batch in task.forced_batches:
            keep = max(batch.answer_lengths) + 1
            fed = batch.prefix.inputs[start][1] if start else None
            with (
                torch.inference_mode(),
                self._whole_pass_keeps(batch.prefix, start),
                self._from_layer(start, fed),
            ):
                logits = self._forward(batch, keep=keep).logits
            width = batch.input_ids.shape[1]
            for row, length in enumerate(batch.answer_lengths):
                # One row's answer positions at a time, in float32: with a 150k vocabulary a
                # whole batch's log-softmax would be gigabytes.
                targets = batch.input_ids[row, width - length :].unsqueeze(-1)
                predicted = logits[row, keep - length - 1 : keep - 1].float()
                ce = predicted.logsumexp(-1) - predicted.gather(-1, targets).squeeze(-1)
                yield ce.tolist()

    @contextlib.contextmanager
    def _from_layer(self, start: int, cached: torch.Tensor | None) -> Iterator[None]:
        """Run only layers start..L-1, feeding layer `start` its cached input."""
        if start == 0 or cached is None:
            yield
            return
        decoder = self.model.model
        layers = decoder.layers

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

    def _forward(self, batch: _Batch, *, keep: int, cache: Any = None) -> Any:
        """A pass over a whole batch that computes the logits of its last `keep` positions."""
        with self._last_mlp_at(keep):
            return self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                cache=cache,
                use_cache=cache is not None,
                logits_to_keep=keep,
            )

    @contextlib.contextmanager
    def _last_mlp_at(self, keep: int) -> Iterator[None]:
        """Run the last layer's MLP only at the last `keep` positions.

        Only their logits are read, and every module after the last attention works position
        by position, so elsewhere the MLP's output is never used (zeros stand in for it). The
        last layer's attention still runs everywhere: its KV cache serves the decoding steps.
        That saves most of one layer of every pass over a prompt, whole-model and candidate
        alike, so both still compute the same operations on the same shapes.
        """
        mlp = self.model.model.layers[-1].mlp
        width = 0

        def cut(_: nn.Module, args: tuple) -> tuple:
            nonlocal width
            width = args[0].shape[1]
            # A copy, not a view: a view's offset into the batch changes the alignment the
            # matrix products see, and with it their rounding (from one model copy to another).
            return (args[0][:, -keep:].contiguous(), *args[1:])

        def pad(_: nn.Module, __: tuple, output: torch.Tensor) -> torch.Tensor:
            return nn.functional.pad(output, (0, 0, width - output.shape[1], 0))

        handles = [mlp.register_forward_pre_hook(cut), mlp.register_forward_hook(pad)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _generate(self, task: Task, max_new_tokens: int, start: int) -> list[str]:
        began = time.perf_counter()
        outputs: list[str] = []
        for batch in task.prompt_batches:
            settled = self._settled(task, len(outputs))
            trajectory = batch.trajectory
            record: _Trajectory | None = None
            steps: contextlib.AbstractContextManager[Step]
            if trajectory is not None and start and trajectory.clock >= self._below(start):
                steps = contextlib.nullcontext(self._follow(trajectory, start))
            else:
                record = _Trajectory(self._clock, batch.input_ids.shape[1])
                steps = self._recording(record)
            with steps as step:
                rows = greedy_decode(
                    self.model,
                    batch.input_ids,
                    batch.attention_mask,
                    max_new_tokens,
                    self._eos,
                    prefill=self._prefill(batch, start),
                    step=step,
                    settled=settled,
                )
            if record is not None:
                batch.trajectory = record if self._replayable(record) else None
            self.counters.generated_tokens += sum(len(row) for row in rows)
            outputs += [str(self.tokenizer.decode(row, skip_special_tokens=True)) for row in rows]
        self.counters.generation_seconds += time.perf_counter() - began
        return outputs

    def _settled(self, task: Task, offset: int) -> Settled | None:
        """In exact mode, whether a row (of the batch whose first sample is `offset`) has
        already missed its reference, whatever it generates next (`answers.early_miss`): its
        score is known, so it stops there, in every evaluation alike."""
        misses = self._early_miss
        if task.mode != "exact" or misses is None:
            return None
        references = task.references
        return lambda row, tokens: misses(tokens, references[offset + row])

    def _step(self, tokens: torch.Tensor, mask: torch.Tensor, at: torch.Tensor, cache: Any) -> Any:
        """One decoding pass (of the layers `_from_layer` leaves), as `greedy_decode` runs it."""
        return self.model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=at,
            cache=cache,
            use_cache=True,
        )

    @contextlib.contextmanager
    def _recording(self, record: _Trajectory) -> Iterator[Step]:
        """A decoding step that runs every layer and writes what it computed into `record`."""
        from transformers.cache_utils import DynamicSlidingWindowLayer

        layers = self.model.model.layers
        entered: list[torch.Tensor] = []

        def capture(_: nn.Module, args: tuple, kwargs: dict) -> None:
            entered.append(args[0] if args else kwargs["hidden_states"])

        def step(
            index: int, tokens: torch.Tensor, _: torch.Tensor, mask: torch.Tensor,
            at: torch.Tensor, cache: Any,
        ) -> Any:  # fmt: skip
            entered.clear()
            record.sliding.append(
                {
                    j: copy.copy(entry)
                    for j, entry in enumerate(cache.layers)
                    if isinstance(entry, DynamicSlidingWindowLayer)
                }
            )
            out = self._step(tokens, mask, at, cache)
            record.tokens.append(tokens)
            record.inputs.append(list(entered))
            record.cache = out.cache
            return out

        handles = [layer.register_forward_pre_hook(capture, with_kwargs=True) for layer in layers]
        try:
            yield step
        finally:
            for handle in handles:
                handle.remove()

    def _replayable(self, record: _Trajectory) -> bool:
        """Whether every step of `record` is complete and every cache entry of a kind that
        `_Trajectory.layer_before` can rewind."""
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        depth = len(self.model.model.layers)
        return (
            record.cache is not None
            and all(len(entered) == depth for entered in record.inputs)
            and all(
                type(entry) in (DynamicLayer, DynamicSlidingWindowLayer)
                for entry in record.cache.layers
            )
        )

    def _follow(self, trajectory: _Trajectory, start: int) -> Step:
        """A decoding step from layer `start` that reuses `trajectory` where it may (see the
        module docstring); elsewhere it runs every layer, as a whole-model pass does."""
        agree: torch.Tensor | None = None
        own_below = True  # whether the cache below `start` is the batch's own, up to date

        def step(
            index: int, tokens: torch.Tensor, live: torch.Tensor, mask: torch.Tensor,
            at: torch.Tensor, cache: Any,
        ) -> Any:  # fmt: skip
            nonlocal agree, own_below
            same = (
                tokens == trajectory.tokens[index]
                if index < len(trajectory.tokens)
                else torch.zeros_like(live)
            )
            agree = same if agree is None else agree & same
            follow = bool((agree | ~live).all())
            if follow or not own_below:
                # The trajectory's entries below `start`, as long as before this step (the
                # attention mask is sized from them); an open row that agreed so far has
                # exactly these.
                for j in range(start):
                    cache.layers[j] = trajectory.layer_before(j, index)
                own_below = not follow
            if not follow:
                return self._step(tokens, mask, at, cache)
            self.counters.trajectory_steps += 1
            with self._from_layer(start, trajectory.inputs[index][start]):
                return self._step(tokens, mask, at, cache)

        return step

    def _prefill(self, batch: _Batch, start: int) -> Callable[[], Any]:
        """The prompt pass of generation from layer `start` (0: every layer), with the shared
        KV cache below."""

        def prefill() -> Any:
            # A fresh cache, so the attention mask is sized for a pass over the whole prompt;
            # the shared entries of the layers below go in afterwards (copies: decoding grows
            # them, and the next candidate needs them as they are).
            cache = self._new_cache()
            fed = batch.prefix.inputs[start][1] if start else None
            with self._whole_pass_keeps(batch.prefix, start), self._from_layer(start, fed):
                out = self._forward(batch, keep=1, cache=cache)
            if not start:
                self._keep_kv(batch.prefix, cache, range(len(cache.layers) - 1))
            for j in range(start):
                cache.layers[j] = copy.copy(batch.prefix.kv[j][1])
            return out

        return prefill

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
