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
from hubmerge.errors import SourceError
from hubmerge.tensorfile import TensorInfo, read_header

#: What a merge needs from a model repository; nothing else is downloaded.
CONFIG_PATTERNS = ["config.json"]
SUPPORT_PATTERNS = [
    "config.json",
    "generation_config.json",
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


def is_hub_id(ref: str) -> bool:
    """Whether `ref` names a Hub repository (and no local folder of that name exists)."""
    return bool(_HUB_ID.match(ref)) and not Path(ref).exists()


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
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise SourceError(f"{ref}: no config.json in {folder.name}") from None
    except (OSError, ValueError) as e:
        raise SourceError(f"{ref}: config.json is unreadable ({e})") from None


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
        config = read_config(path, ref)
        arch.architecture(config, ref)
        return cls(ref, path, config, _index_tensors(path, ref, allow_pickle))

    @property
    def num_layers(self) -> int:
        return arch.num_layers(self.config, self.ref)

    @cached_property
    def layers(self) -> list[dict[str, TensorInfo]]:
        """Per layer index, the layer's tensors by suffix (`mlp.down_proj.weight`)."""
        layers: list[dict[str, TensorInfo]] = [{} for _ in range(self.num_layers)]
        for name, info in self.tensors.items():
            parsed = arch.split_layer_name(name)
            if parsed is None:
                continue
            index, suffix = parsed
            if index >= len(layers):
                raise SourceError(f"{self.ref}: tensor {name} is beyond num_hidden_layers")
            layers[index][suffix] = info
        for index, tensors in enumerate(layers):
            if not tensors:
                raise SourceError(f"{self.ref}: layer {index} has no tensors (model incomplete)")
        return layers

    @property
    def non_layer(self) -> dict[str, TensorInfo]:
        return {n: t for n, t in self.tensors.items() if arch.split_layer_name(n) is None}


def _index_tensors(path: Path, ref: str, allow_pickle: bool) -> dict[str, TensorInfo]:
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise SourceError(f"{index_file}: unreadable shard index ({e})") from None
        files = sorted({path / f for f in weight_map.values()})
    else:
        files = sorted(path.glob("*.safetensors"))
        weight_map = {}
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
        if not file.exists():
            raise SourceError(f"{ref}: shard {file.name} named in the index is missing")
        tensors.update(read_header(file))
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
