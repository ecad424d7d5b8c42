"""What the Space (space/app.py) does besides drawing the page: checks, previews and merge jobs.

The Space is a thin layer over hubmerge's Python API, like the CLI; this module holds the parts
a web page needs and a terminal does not, kept free of gradio so they are tested on their own:

- `shared_space()`: whether strangers use this process (on Hugging Face Spaces, or with
  `HUBMERGE_SPACE=1`). Then `check_shared` accepts Hub ids only, so nobody makes the server read
  its own files, and `refuse_implicit_token` keeps the Space owner's token out of every request.
- `preview`: the layer map of passthrough and block expansion from `config.json` files alone,
  before any weights are downloaded.
- `check_disk`: the weights to download plus the output must fit on the disk.
- `MergeJob`: one merge on a worker thread in a temporary folder, reporting to `JobReporter`,
  which a page polls to stream the log and move a progress bar.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects

from hubmerge import arch
from hubmerge.card import CARD_FILE, LAYER_MAP_FILE
from hubmerge.config import (
    BlockExpansionConfig,
    LinearConfig,
    MergeConfig,
    OlmConfig,
    PassthroughConfig,
    loads_config,
)
from hubmerge.errors import ConfigError, OutputError, SourceError
from hubmerge.hub import upload_files
from hubmerge.methods import block_expansion, linear, passthrough
from hubmerge.plan import MergePlan
from hubmerge.sources import (
    CONFIG_PATTERNS,
    WEIGHT_PATTERNS,
    ModelSource,
    fetch,
    is_hub_id,
    read_config,
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
    if shared_space():
        check_shared(config)
    return config


def check_shared(config: MergeConfig) -> None:
    """Refuse whatever would make a shared Space read its own files: every model (and dataset)
    must be a Hub id, and a card template cannot be a path on the server.
    """
    for ref in config.referenced_models():
        if not is_hub_id(ref):
            raise ConfigError(
                f"{ref}: not a Hub id; this shared Space only reads models from the Hub "
                "(ORG/NAME or ORG/NAME@REVISION), never files on the server"
            )
    if isinstance(config, OlmConfig):
        for name in config.dataset:
            if not is_hub_id(name):
                raise ConfigError(
                    f"dataset {name}: not a Hub id; this shared Space reads no files on the server"
                )
        # Even Hub-hosted: OLM reads its datasets as local JSON files, and scores every candidate
        # layer by generating text, hours on a shared CPU.
        raise ConfigError(
            "olm: OLM reads its datasets from local JSON files, which this shared Space does not "
            "do; run it with `hubmerge merge` or a self-hosted Space"
        )
    if config.card and config.card.template:
        raise ConfigError(
            "card.template: a path on the server; this shared Space uses the default card"
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
    config = read_config(folder, ref)
    arch.architecture(config, ref)
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

    def log(self, message: str) -> None:
        self.lines.append(message)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class MergeJob:
    """One merge on a worker thread, into `folder/NAME`; `close()` removes the folder.

    Before any weights are downloaded, the job previews the config and checks the disk, so
    what can fail early does; `error` holds what stopped it, `out_dir` the model once done.
    """

    def __init__(self, config: MergeConfig, name: str) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix=_JOB_PREFIX))
        self.out_dir = self.folder / check_name(name)
        self.reporter = JobReporter()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(config,), daemon=True)
        self._thread.start()

    def _run(self, config: MergeConfig) -> None:
        from hubmerge.merge import merge

        log = self.reporter.log
        try:
            log("reading the models' configs")
            check_disk(config, preview(config), self.folder)
            if any(is_hub_id(ref) for ref in config.referenced_models()):
                log("downloading weights (from the Hub, or its cache)")
            merge(config, self.out_dir, progress=self.reporter, reporter=self.reporter)
            log(f"done: {self.out_dir.name}")
        except BaseException as e:  # reported to the page, which shows hubmerge's errors as is
            self.error = e

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds; whether the job has finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def close(self) -> None:
        discard(self.out_dir)

    def abandon(self) -> None:
        """Remove the folder once the merge stops (nobody waits for it; a thread cannot be
        stopped from outside, and removing files under a running merge would fail it noisily).
        """
        threading.Thread(target=lambda: (self._thread.join(), self.close()), daemon=True).start()


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
