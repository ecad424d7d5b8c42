"""What the Space (space/app.py) does besides drawing the page: checks, previews and merge jobs.

The Space is a thin layer over hubmerge's Python API, like the CLI; this module holds the parts
a web page needs and a terminal does not, kept free of gradio so they are tested on their own:

- `shared_space()`: whether strangers use this process (on Hugging Face Spaces, or with
  `HUBMERGE_SPACE=1`). Then `check_shared` accepts Hub models and datasets only, so nobody
  makes the server read its own files, and `refuse_implicit_token` keeps the Space owner's
  token out of every request.
- `preview`: the layer map of passthrough and block expansion from `config.json` files alone,
  before any weights are downloaded.
- `check_disk`: the weights to download plus the output must fit on the disk.
- `check`: the editor's config and its models' configs, validated in a `Budgeted` subprocess.
- `MergeJob`: one merge in a `Budgeted` subprocess in a temporary folder, reporting to
  `JobReporter`, which a page polls to stream the log and move a progress bar.

Every untrusted input is bounded before it costs anything (`hubmerge.limits`), and on top of
that each validation and merge runs in a forked process with its own time and memory budget
(`Budgeted`): one visitor's request that still goes wrong is stopped alone, and the others'
jobs keep running. Merges take turns (`JOB_SLOTS`); the checks before a merge do not wait.
"""

from __future__ import annotations

import base64
import multiprocessing
import os
import re
import resource
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects

from hubmerge.card import CARD_FILE, LAYER_MAP_FILE
from hubmerge.config import (
    BlockExpansionConfig,
    LinearConfig,
    MergeConfig,
    MergekitConfig,
    OlmConfig,
    PassthroughConfig,
    loads_config,
)
from hubmerge.datasets import is_hub_dataset
from hubmerge.errors import BudgetError, ConfigError, HubmergeError, OutputError, SourceError
from hubmerge.hub import upload_files
from hubmerge.methods import block_expansion, linear, mergekit_run, passthrough
from hubmerge.plan import MergePlan
from hubmerge.sources import (
    CONFIG_PATTERNS,
    WEIGHT_PATTERNS,
    ModelSource,
    fetch,
    is_hub_id,
    read_config,
    read_index,
)
from hubmerge.tensorfile import DTYPE_CODES, ITEMSIZE, TensorInfo

#: Set to 1 to run as a shared Space away from Hugging Face (Spaces set `SYSTEM=spaces`).
SPACE_ENV = "HUBMERGE_SPACE"
#: A model name becomes a folder and a repo name: no slashes, no leading dot.
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}$")
#: Every job's temporary folder starts so; `discard` removes nothing else.
_JOB_PREFIX = "hubmerge-space-"
#: Above this the weights are not offered for download (copying them for the browser would
#: double the disk they take): publish them instead.
DOWNLOAD_LIMIT = 2 * 10**9
#: A merge's budget: wall seconds (downloads included) and memory beyond the server's own.
JOB_SECONDS = int(os.environ.get("HUBMERGE_JOB_SECONDS", 3 * 3600))
JOB_MEMORY = int(os.environ.get("HUBMERGE_JOB_MEMORY", 8 * 2**30))
#: A validation's budget: it reads configs only.
CHECK_SECONDS = int(os.environ.get("HUBMERGE_CHECK_SECONDS", 120))
CHECK_MEMORY = int(os.environ.get("HUBMERGE_CHECK_MEMORY", 2 * 2**30))
#: Merges running at once (the others wait their turn, checked already).
JOB_SLOTS = threading.BoundedSemaphore(int(os.environ.get("HUBMERGE_JOBS", "1")))


def shared_space() -> bool:
    """Whether strangers use this process: on Hugging Face Spaces, or with HUBMERGE_SPACE=1."""
    return os.environ.get("SYSTEM") == "spaces" or os.environ.get(SPACE_ENV) == "1"


def refuse_implicit_token() -> None:
    """Send no token the caller did not give: the Space owner's `HF_TOKEN` or login must never
    let a visitor read the owner's private or gated models, or publish as the owner.

    Process-wide (huggingface_hub reads the flag on every request); publishing passes the
    visitor's token explicitly, which this does not affect.
    """
    constants.HF_HUB_DISABLE_IMPLICIT_TOKEN = True


def read_config_text(text: str) -> MergeConfig:
    """The config in the editor, validated; on a shared Space also `check_shared`."""
    config = loads_config(text, "config")
    if isinstance(config, MergekitConfig):
        mergekit_run.validate(config, "config")
    if shared_space():
        check_shared(config)
    return config


def check_shared(config: MergeConfig) -> None:
    """Refuse whatever would make a shared Space read its own files: every model must be a Hub
    id, every OLM dataset a file in a Hub dataset repo, and a card template cannot be a path on
    the server.
    """
    for ref in config.referenced_models():
        if not is_hub_id(ref):
            raise ConfigError(
                f"{ref}: not a Hub id; this shared Space only reads models from the Hub "
                "(ORG/NAME or ORG/NAME@REVISION), never files on the server"
            )
    if isinstance(config, OlmConfig):
        for name in config.dataset:
            if not is_hub_dataset(name):
                raise ConfigError(
                    f"dataset {name}: not a file in a Hub dataset repo; this shared Space reads "
                    "datasets from the Hub only (hf://datasets/ORG/NAME/FILE.json), never files "
                    "on the server"
                )
    if config.card and config.card.template:
        raise ConfigError(
            "card.template: a path on the server; this shared Space uses the default card"
        )
    if isinstance(config, MergekitConfig) and "tokenizer" in config.mergekit_data():
        # mergekit reads the models a `tokenizer:` section names itself, local paths included.
        raise ConfigError(
            "tokenizer: mergekit would read the models it names itself, which this shared Space "
            "does not allow; use tokenizer_source: ORG/NAME"
        )


def check_name(name: str) -> str:
    """The output model's name, which becomes its folder and the title of its card."""
    name = name.strip()
    if not _NAME.match(name):
        raise ConfigError(
            f"model name {name!r}: use letters, digits, '-', '_' and '.' (at most 96), "
            "starting with a letter or digit"
        )
    return name


# -- preview from configs ---------------------------------------------------------------------

#: Methods whose layer map follows from the models' configs. NER reads the weights and OLM runs
#: the model, so their layer maps exist only after the merge.
PREVIEW_PLANNERS: dict[type, Callable[..., MergePlan]] = {
    PassthroughConfig: passthrough.plan,
    BlockExpansionConfig: block_expansion.plan,
    LinearConfig: linear.plan,
    # Lineage and depth only (mergekit blends every model into each tensor), which bounds the
    # output's size for the disk check; the page shows the parameters instead of a layer map.
    MergekitConfig: mergekit_run.plan,
}


@dataclass(frozen=True)
class Preview:
    """What can be known before downloading weights: the models, and the plan where it is fixed."""

    sources: dict[str, ModelSource]
    #: None for methods that decide the layer map while merging (NER, OLM).
    plan: MergePlan | None

    def output_bound(self, out_dtype: str | None) -> int:
        """Bytes of weights the merge will write, or a bound where the plan is not known yet.

        NER and OLM keep the depth of their pool, so the largest model, in the output dtype,
        bounds their output.
        """
        if self.plan is not None:
            from hubmerge.writer import output_size

            return output_size(self.plan, self.sources)
        itemsize = ITEMSIZE[DTYPE_CODES[out_dtype]] if out_dtype else 0
        return max(
            sum(max(t.nbytes, t.nbytes // ITEMSIZE[t.dtype] * itemsize) for t in s.tensors.values())
            for s in self.sources.values()
        )


def preview(config: MergeConfig) -> Preview:
    """The models as their configs describe them, checked for compatibility, and the plan.

    Hub models cost one `config.json` each; local folders (allowed off a shared Space) are read
    as the merge reads them, headers only.
    """
    from hubmerge.merge import check_compatible

    sources = {ref: preview_source(ref) for ref in config.referenced_models()}
    check_compatible(sources)
    planner = PREVIEW_PLANNERS.get(type(config))
    return Preview(sources, planner(config, sources) if planner else None)


def preview_source(ref: str) -> ModelSource:
    """`ref` for a preview: a local folder as it is, a Hub model from its `config.json` alone."""
    if not is_hub_id(ref):
        return ModelSource.open(ref)
    return config_source(ref, fetch(ref, CONFIG_PATTERNS))


def config_source(ref: str, folder: Path) -> ModelSource:
    """`ref` as far as `folder/config.json` tells: every tensor's name, shape and dtype.

    The tensors are those of the transformers model the config describes, built on the meta
    device (no memory, a fraction of a second even for large models): the names and shapes a
    checkpoint of that config holds, so the methods' own planners run on them unchanged. Nothing
    may read their bytes; the merge reads the real headers, which decide where they differ.
    """
    config = read_config(folder, ref)  # bounded: num_hidden_layers <= MAX_LAYERS
    read_index(folder, ref)  # shard names: none may leave the model's folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise SourceError(f"{ref}: config.json does not describe a usable model ({e})") from None
    dtype = DTYPE_CODES.get(config.get("dtype") or config.get("torch_dtype") or "float32", "F32")
    no_data = folder / "config.json"  # TensorInfo names a file; these tensors have none
    tensors = {
        name: TensorInfo(name, no_data, dtype, tuple(p.shape), 0, p.numel() * ITEMSIZE[dtype])
        for name, p in model.named_parameters()
    }
    return ModelSource(ref, folder, config, tensors)


# -- disk ------------------------------------------------------------------------------------


def hub_weights_size(ref: str) -> int:
    """Bytes of the weight files a merge downloads for Hub model `ref`, from the Hub's file list."""
    repo_id, _, revision = ref.partition("@")
    try:
        files = [
            f
            for f in HfApi().list_repo_tree(repo_id, revision=revision or None, recursive=True)
            if isinstance(f, RepoFile)
        ]
    except HfHubHTTPError as e:
        raise SourceError(
            f"{ref}: cannot list its files on the Hub: {str(e).splitlines()[0]}"
        ) from None
    weights = filter_repo_objects(files, allow_patterns=WEIGHT_PATTERNS, key=lambda f: f.path)
    return sum(f.size for f in weights)


def check_disk(config: MergeConfig, preview: Preview, folder: Path) -> None:
    """Refuse a merge that cannot fit: the weights to download plus the output.

    Conservative: every Hub model counts in full even if the Hub cache holds it already, and
    both the cache's disk and `folder`'s must have room for all of it.
    """
    downloads = sum(hub_weights_size(ref) for ref in preview.sources if is_hub_id(ref))
    need = downloads + preview.output_bound(config.out_dtype or config.dtype)
    cache = _existing(Path(constants.HF_HUB_CACHE))
    free = min(shutil.disk_usage(cache).free, shutil.disk_usage(folder).free)
    if need > free:
        raise OutputError(
            f"not enough disk space: this merge needs {_gb(need)} "
            f"({_gb(downloads)} of weights to download), and {_gb(free)} is free"
        )


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent (the Hub cache is created on first download)."""
    while not path.exists():
        path = path.parent
    return path


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:,.1f} GB"


# -- merge jobs -------------------------------------------------------------------------------


class JobReporter:
    """What a merge reports (the writer's `Progress` and the methods' `Reporter`), kept for a
    page that polls it from another thread: the log so far and the bar now running.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        #: [description, done, total] of the bar now running; a list so its step can move it.
        self.bar: list[str | int] | None = None

    def start(self, total_bytes: int, total_tensors: int) -> None:
        self.log(f"writing {total_tensors} tensors, {total_bytes / 1e6:,.1f} MB")
        self.bar = ["writing weights", 0, total_bytes]

    def advance(self, nbytes: int) -> None:
        assert self.bar is not None
        self.bar[1] += nbytes  # type: ignore[operator]

    def progress(self, description: str, total: int) -> Callable[[], None]:
        bar: list[str | int] = [description, 0, total]
        self.bar = bar

        def step() -> None:
            bar[1] += 1  # type: ignore[operator]

        return step

    def step(self) -> None:
        """Advance the bar now running (what a step of a `Budgeted` job's bar arrives as)."""
        if self.bar is not None:
            self.bar[1] += 1  # type: ignore[operator]

    def log(self, message: str) -> None:
        self.lines.append(message)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True)
class Checked:
    """What validating a config found: the method, each model's depth and the layer map."""

    method: str
    layers: dict[str, int]
    #: The plan's layer map and depth; None for methods that decide the layer map while
    #: merging (NER, OLM).
    rows: list[tuple[str, str, str, str]] | None
    depth: int | None
    #: For methods mergekit computes: their parameter tables (`mergekit_run.parameter_tables`).
    parameters: list[dict[str, Any]] | None = None


def check(text: str) -> Checked:
    """Validate the editor's config and preview its plan, in a `Budgeted` subprocess."""
    job = Budgeted(_check, (text,), {}, CHECK_SECONDS, CHECK_MEMORY)
    job.wait(None)
    if job.error is not None:
        raise job.error
    result: Checked = job.result
    return result


def _check(text: str) -> Checked:
    config = read_config_text(text)
    previewed = preview(config)
    layers = {ref: s.num_layers for ref, s in previewed.sources.items()}
    plan = previewed.plan
    if isinstance(config, MergekitConfig) and plan is not None:
        tables = mergekit_run.parameter_tables(config.mergekit_data())
        return Checked(config.merge_method, layers, None, len(plan.layers), tables)
    if plan is None:
        return Checked(config.merge_method, layers, None, None)
    return Checked(config.merge_method, layers, plan.rows(), len(plan.layers))


class Budgeted:
    """`target(*args, **kwargs)` in a forked process that may use `seconds` of wall time and
    `memory` bytes beyond what the server already holds (its address space is capped), then is
    killed: a request that goes wrong costs its visitor alone.

    The child reports through a pipe: `reporter` (a `JobReporter`) hears what it logs, when
    given, and `result` or `error` holds the outcome once `wait` says it ended.
    """

    def __init__(
        self,
        target: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        seconds: float,
        memory: int,
        reporter: JobReporter | None = None,
        slots: threading.BoundedSemaphore | None = None,
    ) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._call = (target, args, kwargs)
        self._seconds = seconds
        self._memory = memory
        self._reporter = reporter
        self._slots = slots
        self._process: multiprocessing.process.BaseProcess | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        slots, reporter = self._slots, self._reporter
        if slots is not None and not slots.acquire(blocking=False):
            if reporter:
                reporter.log("waiting for the merge before this one to finish")
            while not slots.acquire(timeout=0.5):
                if self._stopped.is_set():
                    return
        try:
            self._follow()
        finally:
            if slots is not None:
                slots.release()

    def _follow(self) -> None:
        if self._stopped.is_set():
            return
        seconds, memory, reporter = self._seconds, self._memory, self._reporter
        context = multiprocessing.get_context("fork")  # the child has what this process has
        receive, send = context.Pipe(duplex=False)
        process = context.Process(
            target=_child, args=(send, *self._call, memory, reporter is not None)
        )
        self._process = process
        process.start()
        send.close()
        deadline = time.monotonic() + seconds
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.error = BudgetError(
                        f"stopped after {seconds:,.0f} s, the time this Space gives each job"
                    )
                    break
                if not receive.poll(min(left, 0.5)):
                    if self._stopped.is_set():
                        break
                    continue
                try:
                    kind, payload = receive.recv()
                except (EOFError, OSError):
                    self.error = BudgetError(
                        "the job was stopped (killed, or over the memory this Space gives each "
                        f"job: {memory / 2**30:,.1f} GiB)"
                    )
                    break
                if kind == "result":
                    self.result = payload
                    break
                if kind == "error":
                    self.error = payload
                    break
                if reporter is not None:
                    getattr(reporter, kind)(*payload)
        finally:
            receive.close()
            if process.is_alive():
                process.kill()
            process.join()

    def wait(self, timeout: float | None) -> bool:
        """Wait up to `timeout` seconds (None: until it ends); whether the job has ended."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Kill the job (or cancel it while it waits its turn)."""
        self._stopped.set()
        if self._process is not None and self._process.is_alive():
            self._process.kill()


def _child(
    send: Connection,
    target: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    memory: int,
    relay: bool,
) -> None:
    """The forked side of `Budgeted`: cap the address space, run, send the outcome."""
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * page
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = mapped + memory if hard == resource.RLIM_INFINITY else min(hard, mapped + memory)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        if relay:
            kwargs = kwargs | {"reporter": _Relay(send)}
        send.send(("result", target(*args, **kwargs)))
    except MemoryError:
        message = f"over the memory this Space gives each job ({memory / 2**30:,.1f} GiB)"
        send.send(("error", BudgetError(message)))
    except HubmergeError as e:
        send.send(("error", e))
    except BaseException as e:  # a bug: the details go to the server's log, the page the gist
        traceback.print_exception(e)
        send.send(("error", RuntimeError(f"unexpected {type(e).__name__}")))
    finally:
        send.close()


class _Relay:
    """A `JobReporter` in the child: each call goes through the pipe to the parent's."""

    def __init__(self, send: Connection) -> None:
        self._send = send

    def start(self, total_bytes: int, total_tensors: int) -> None:
        self._send.send(("start", (total_bytes, total_tensors)))

    def advance(self, nbytes: int) -> None:
        self._send.send(("advance", (nbytes,)))

    def progress(self, description: str, total: int) -> Callable[[], None]:
        self._send.send(("progress", (description, total)))
        return lambda: self._send.send(("step", ()))

    def log(self, message: str) -> None:
        self._send.send(("log", (message,)))


class MergeJob:
    """One merge in a `Budgeted` subprocess, into `folder/NAME`; `close()` removes the folder.

    Before any weights are downloaded, the job previews the config and checks the disk, so
    what can fail early does; `error` holds what stopped it, `out_dir` the model once done.
    Merges take turns (`JOB_SLOTS`): a job waits for its turn before it starts.
    """

    def __init__(self, config: MergeConfig, name: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=_JOB_PREFIX))
        self.out_dir = self.folder / check_name(name)
        self.reporter = JobReporter()
        self._job = Budgeted(
            _merge,
            (config, self.out_dir),
            {},
            JOB_SECONDS,
            JOB_MEMORY,
            reporter=self.reporter,
            slots=JOB_SLOTS,
        )

    @property
    def error(self) -> BaseException | None:
        return self._job.error

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; whether the job has finished."""
        return self._job.wait(timeout)

    def close(self) -> None:
        discard(self.out_dir)

    def abandon(self) -> None:
        """Nobody waits for the result any more: stop the merge, then remove its folder."""
        self._job.stop()

        def clean_up() -> None:
            self._job.wait(None)
            self.close()

        threading.Thread(target=clean_up, daemon=True).start()


def _merge(config: MergeConfig, out_dir: Path, reporter: JobReporter) -> None:
    """A merge job's work (in the `Budgeted` child): check early, then merge."""
    from hubmerge.merge import merge

    reporter.log("reading the models' configs")
    check_disk(config, preview(config), out_dir.parent)
    if any(is_hub_id(ref) for ref in config.referenced_models()):
        reporter.log("downloading weights (from the Hub, or its cache)")
    merge(config, out_dir, progress=reporter, reporter=reporter)
    reporter.log(f"done: {out_dir.name}")


def discard(model_dir: str | Path | None) -> None:
    """Remove a job's temporary folder, given the model folder it holds (or nothing)."""
    folder = Path(model_dir).parent if model_dir else None
    # Only a folder a job made: whatever the value, nothing else is ever removed.
    if folder is not None and folder.name.startswith(_JOB_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


def card_markdown(model_dir: Path) -> str:
    """The model card as a page shows it: its metadata as a YAML block, the layer map inline.

    A Markdown view would take the `---` block for a rule and a heading, and cannot follow the
    card's relative link to `layer_map.svg`, so the picture goes in as a data URI.
    """
    text = (model_dir / CARD_FILE).read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?\n)---\n(.*)", text, re.DOTALL)
    metadata, body = (match.group(1), match.group(2)) if match else ("", text)
    svg = model_dir / LAYER_MAP_FILE
    if svg.is_file():
        data = base64.b64encode(svg.read_bytes()).decode()
        body = body.replace(f"]({LAYER_MAP_FILE})", f"](data:image/svg+xml;base64,{data})")
    return f"```yaml\n{metadata}```\n{body}" if metadata else body


def download_files(model_dir: Path, limit: int = DOWNLOAD_LIMIT) -> list[Path]:
    """The files a page offers for download: what publishing uploads, without the weights when
    they weigh more than `limit` bytes.
    """
    files = upload_files(model_dir)
    if sum(f.size for f in files) > limit:
        files = tuple(f for f in files if not f.path.endswith(".safetensors"))
    return [model_dir / f.path for f in files]
