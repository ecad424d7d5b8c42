"""Whether a merge fits on the server's disk: the weights it downloads plus its output."""

from __future__ import annotations

import shutil
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import filter_repo_objects

from hubmerge.config import MergeConfig
from hubmerge.errors import OutputError, SourceError
from hubmerge.sources import WEIGHT_PATTERNS, is_hub_id
from hubmerge.space.preview import Preview


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
