"""Models to read layers from: local folders or Hub ids, with lazy access to their tensors.

Only headers are read up front; tensor bytes are touched when the writer copies them. Hub ids
(`org/name` or `org/name@revision`) go through `huggingface_hub.snapshot_download` with
`allow_patterns`, so only weights, configs and tokenizer files are fetched, and the Hub cache
(and `HF_HUB_OFFLINE`) behave as users expect.
"""

from __future__ import annotations

import atexit
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from hubmerge import arch
from hubmerge.errors import SourceError, quoted
from hubmerge.limits import MAX_CONFIG_JSON_BYTES, MAX_INDEX_BYTES
from hubmerge.tensorfile import TensorInfo, read_header

#: What a merge needs from a model repository; nothing else is downloaded.
#: What a preview reads: the config, and the shard index (whose file names are checked early).
CONFIG_PATTERNS = ["config.json", "model.safetensors.index.json"]
SUPPORT_PATTERNS = [
    "config.json",
    "generation_config.json",
    # Globs, so variants (`tokenizer.model.v3`, `spiece.model`) come too; they cover every name
    # of `arch.TOKENIZER_FILES`, which a merge copies.
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
    "README.md",
]
WEIGHT_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
PICKLE_PATTERNS = ["*.bin", "pytorch_model.bin.index.json"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
#: A Hub commit id: what a snapshot folder of the Hub cache is named after.
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_hub_id(ref: str) -> bool:
    """Whether `ref` names a Hub repository (and no local folder of that name exists).

    The Hub's own rules decide (no `..` or `--`, at most 96 characters), and a revision may not
    climb out of the Hub cache's folders (`@../x`).
    """
    if not _HUB_ID.match(ref) or Path(ref).exists():
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, _, revision = ref.partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return ".." not in revision.split("/") and not revision.startswith("/")


def public_name(ref: str) -> str:
    """The name people know model `ref` by: its Hub id (without a revision), or a local
    folder's name, never a path. Cards, plan tables and layer maps show models so.
    """
    if is_hub_id(ref):
        return ref.partition("@")[0]
    return Path(ref).expanduser().resolve().name or ref


def fetch(ref: str, patterns: list[str]) -> Path:
    """The local folder for `ref`: the folder itself, or a Hub snapshot of the given files."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise SourceError(f"{ref}: is a file, expected a model folder or a Hub id")
    if not is_hub_id(ref):
        raise SourceError(f"{ref}: no such model folder (and not a Hub id like org/name)")
    repo_id, _, revision = ref.partition("@")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise SourceError(
            f"{ref}: not in the local Hub cache and the Hub cannot be reached "
            "(offline, or HF_HUB_OFFLINE=1)"
        ) from None
    except HfHubHTTPError as e:
        raise SourceError(f"{ref}: Hub download failed: {str(e).splitlines()[0]}") from None


def read_config(folder: Path, ref: str) -> dict[str, Any]:
    """The model's `config.json`, checked (`arch.check_config`) before anything trusts it."""
    path = model_file(folder, "config.json", ref)
    if path is None:
        raise SourceError(f"{ref}: no config.json in {folder.name}")
    config = read_json(path, ref, MAX_CONFIG_JSON_BYTES)
    if not isinstance(config, dict):
        raise SourceError(f"{ref}: config.json is not a JSON object")
    arch.check_config(config, ref)
    return config


def model_file(folder: Path, name: object, ref: str) -> Path | None:
    """The file `name` of model folder `folder` (None if there is none), or a `SourceError`.

    Every file hubmerge opens from a model goes through here, since a model's own files (an
    index's shard names, a link in the folder) are untrusted: `name` must be a plain relative
    name, without `..`, that resolves (links followed) to a regular file inside the model's own
    folder. A Hub cache snapshot's files are links into the repo's `blobs/`, so for a snapshot
    that folder is the repo's folder in the cache.
    """
    if (
        not isinstance(name, str)
        or not name
        or "\0" in name
        or "\\" in name
        or name.startswith("/")
        or ".." in name.split("/")
    ):
        raise SourceError(
            f"{ref}: file name {quoted(name)} is not a plain name inside the model folder"
        )
    path = folder / name
    if not path.is_symlink() and not path.exists():
        return None
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise SourceError(f"{ref}: {quoted(name)} is a broken link") from None
    if not real.is_relative_to(_root(folder)):
        raise SourceError(f"{ref}: {quoted(name)} leads outside the model folder")
    if not real.is_file():
        raise SourceError(f"{ref}: {quoted(name)} is not a regular file")
    return path


def _root(folder: Path) -> Path:
    """The folder a model's files must lie in: the folder, or its repo's folder in the Hub cache."""
    real = folder.resolve()
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def read_json(path: Path, ref: str, limit: int) -> Any:
    """A JSON file of a model, read only up to `limit` bytes; errors quote none of its text."""
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise SourceError(f"{ref}: {path.name} is unreadable ({e.strerror})") from None
    if len(raw) > limit:
        raise SourceError(f"{ref}: {path.name} is over {limit:,} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SourceError(f"{ref}: {path.name} is not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        problem = f"{e.msg} at byte {e.pos}"
        raise SourceError(f"{ref}: {path.name} is not valid JSON ({problem})") from None
    except RecursionError:
        raise SourceError(f"{ref}: {path.name} is nested too deeply") from None


@dataclass
class ModelSource:
    """One model: where it is, its config, and where each of its tensors lies."""

    ref: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(repr=False)

    @classmethod
    def open(cls, ref: str, *, allow_pickle: bool = False) -> ModelSource:
        patterns = SUPPORT_PATTERNS + WEIGHT_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
        path = fetch(ref, patterns)
        _check_links(path, ref)
        config = read_config(path, ref)
        return cls(ref, path, config, _index_tensors(path, ref, allow_pickle))

    def file(self, name: str) -> Path | None:
        """One of the model's files (see `model_file`), None if it has none of that name."""
        return model_file(self.path, name, self.ref)

    @property
    def name(self) -> str:
        """See `public_name`."""
        return public_name(self.ref)

    @property
    def revision(self) -> str | None:
        """The Hub commit that was read (the snapshot's folder name); None for a local folder."""
        if is_hub_id(self.ref) and _COMMIT.match(self.path.name):
            return self.path.name
        return None

    @property
    def pinned(self) -> str:
        """The reference that reads exactly these files again: `org/name@<commit>` for a Hub
        model (mergekit and hubmerge both read that form), the reference as given otherwise.
        """
        return f"{self.name}@{self.revision}" if self.revision else self.ref

    @property
    def spec(self) -> arch.ArchSpec:
        """How this model's architecture names its tensors (`arch.SPECS`)."""
        return arch.spec(self.config, self.ref)

    @property
    def num_layers(self) -> int:
        return arch.num_layers(self.config, self.ref)

    @cached_property
    def layers(self) -> list[dict[str, TensorInfo]]:
        """Per layer index, the layer's tensors by suffix (`mlp.down_proj.weight`).

        The layer set must add up before anything is planned from it: every tensor under
        `model.layers.` names a layer by its plain number (`00` would shadow `0`) within
        `num_hidden_layers`, and every layer has the tensors its siblings have (a layer written
        short would load as garbage, or not at all).
        """
        spec = self.spec
        layers: list[dict[str, TensorInfo]] = [{} for _ in range(self.num_layers)]
        for name, info in self.tensors.items():
            if not name.startswith(spec.layer_prefix):
                continue
            parsed = spec.split_layer_name(name)
            if parsed is None:
                raise SourceError(
                    f"{self.ref}: tensor {quoted(name)} is not named {spec.layer_prefix}N.NAME "
                    "with N a plain layer number"
                )
            index, suffix = parsed
            if index >= len(layers):
                raise SourceError(f"{self.ref}: tensor {name} is beyond num_hidden_layers")
            layers[index][suffix] = info
        every = set().union(*layers)
        for index, tensors in enumerate(layers):
            if not tensors:
                raise SourceError(f"{self.ref}: layer {index} has no tensors (model incomplete)")
            missing = sorted(every - tensors.keys())
            if missing:
                raise SourceError(
                    f"{self.ref}: layer {index}: tensor {missing[0]} is missing "
                    "(other layers have it: model incomplete or damaged)"
                )
        return layers

    @property
    def non_layer(self) -> dict[str, TensorInfo]:
        prefix = self.spec.layer_prefix
        return {n: t for n, t in self.tensors.items() if not n.startswith(prefix)}


def _check_links(folder: Path, ref: str) -> None:
    """Refuse a folder with a link that leads outside it, or a file that is not a plain file (a
    FIFO would block whoever opens it): transformers and mergekit open the folder's files by
    themselves (tokenizer, config), so every one of them must be the model's own.
    """
    try:
        entries = list(folder.iterdir())
    except OSError as e:
        raise SourceError(f"{ref}: cannot list the model folder ({e.strerror})") from None
    for entry in entries:
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            model_file(folder, entry.name, ref)


def read_index(folder: Path, ref: str) -> dict[str, str] | None:
    """`model.safetensors.index.json`'s `weight_map` (tensor -> shard file), None without an
    index: an object of strings, whose every shard name `model_file` accepts (a shard not yet
    downloaded is checked by name alone).
    """
    index_file = model_file(folder, "model.safetensors.index.json", ref)
    if index_file is None:
        return None
    index = read_json(index_file, ref, MAX_INDEX_BYTES)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{ref}: {index_file.name} has no weight_map of tensors to shard files")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise SourceError(
                f"{ref}: {index_file.name}: weight_map[{quoted(name)}] is not a file name"
            )
    for shard in set(weight_map.values()):
        model_file(folder, shard, ref)
    return weight_map


def _index_tensors(path: Path, ref: str, allow_pickle: bool) -> dict[str, TensorInfo]:
    weight_map = read_index(path, ref) or {}
    if weight_map:
        names = sorted(set(weight_map.values()))
    else:
        names = sorted(p.name for p in path.glob("*.safetensors"))
    files = []
    for name in names:
        file = model_file(path, name, ref)
        if file is None:
            raise SourceError(f"{ref}: shard {quoted(name)} named in the index is missing")
        files.append(file)
    if not files:
        files = _unpickled(path, ref) if allow_pickle else []
    if not files:
        pickles = sorted(p.name for p in path.glob("*.bin"))
        if pickles:
            raise SourceError(
                f"{ref}: has only pickle checkpoints ({pickles[0]}); refusing to unpickle them "
                "(pass --allow-pickle to load them with torch weights_only=True)"
            )
        raise SourceError(f"{ref}: no .safetensors weights in {path.name}")
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(file).items():
            if name in tensors:
                raise SourceError(
                    f"{ref}: tensor {quoted(name)} is in both {tensors[name].file.name} "
                    f"and {file.name}"
                )
            tensors[name] = info
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise SourceError(f"{ref}: tensor {missing[0]} is in the index but in no shard")
    return tensors


def _unpickled(path: Path, ref: str) -> list[Path]:
    """Convert `.bin` checkpoints to temporary safetensors files, one shard at a time."""
    import torch
    from safetensors.torch import save_file

    out = Path(tempfile.mkdtemp(prefix="hubmerge-unpickled-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    files = []
    for i, binary in enumerate(sorted(path.glob("*.bin"))):
        try:
            state = torch.load(binary, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise SourceError(f"{ref}: cannot load {binary.name} safely ({e})") from None
        target = out / f"part-{i:05d}.safetensors"
        # Tied weights share storage in a pickle; safetensors wants distinct tensors.
        save_file({k: v.clone().contiguous() for k, v in state.items()}, target)
        files.append(target)
    return files
