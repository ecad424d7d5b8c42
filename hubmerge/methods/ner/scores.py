"""Normalized Effective Rank (NER) of weight matrices: exact, fast, streamed and cached.

NER of a matrix A (seed 002): its singular values s, those above 1e-12 kept, p = s / sum(s),
H = -sum(p log2 p), NER = H / log2(n) with n the number of values kept; 0 for a single value
(or none). Computed on the raw weights: NER is scale-invariant, so no normalisation is needed.
The public implementation min-max normalises A to [0, 1] first, which adds a large rank-one
component and changes the ranking; `normalize="minmax"` reproduces it for old merges.

Only singular values are needed, so they come from the eigenvalues of the smaller Gram matrix
(A Aᵀ or Aᵀ A) in float64: products of float32 values are exact in float64, and a symmetric
eigensolver on the smaller side is much cheaper than an SVD, above all of a tall matrix. Where
the Gram spectrum reaches down to float64's rounding noise (a rank-deficient or zeroed matrix),
the eigenvalues cannot tell a tiny singular value from a zero one, so that matrix falls back to
a float64 SVD. Either way the result agrees with a float64 SVD to far better than 1e-6.

Tensors are read one at a time from their files (never a whole model) and kept in their stored
dtype; the Gram matrix is accumulated from float64 slices, so a matrix never exists whole in
float64. On `cuda` one matrix is scored at a time. On the CPU, where LAPACK's eigensolvers
gain little from threads, each core scores its own matrix single-threaded: faster, immune to
the thread stalls of a busy machine, and bit-reproducible whatever the core count.

Scores are cached per model file, keyed by its path, size and mtime and the normalisation, so
a run with one more candidate only scores the new model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from hubmerge.folder import atomic_write
from hubmerge.tensorfile import TensorInfo, read_tensor

Normalize = Literal["none", "minmax"]

#: Singular values at or below this are treated as zero (seed 002's threshold).
THRESHOLD = 1e-12
#: Gram eigenvalues must stay this many times above float64's rounding noise (n * eps * the
#: largest eigenvalue) to be trusted; below, the matrix is scored by an SVD instead.
_NOISE_MARGIN = 1000.0
#: Part of the cache key: bump when the numbers a cached score holds would change.
_CACHE_VERSION = 1
#: Float64 elements per slice of a matrix while its Gram matrix is accumulated (32 MB).
_SLICE = 1 << 22


def ner_of(singular_values: np.ndarray | torch.Tensor) -> float:
    """NER from a matrix's singular values (any order), computed in float64."""
    s = np.asarray(singular_values, dtype=np.float64)
    s = s[s > THRESHOLD]
    if s.size < 2:
        return 0.0  # log2(1) = 0: the public implementation defines a single value as 0
    p = s / s.sum()
    return float(-(p * np.log2(p)).sum() / np.log2(s.size))


def singular_values(matrix: torch.Tensor) -> torch.Tensor:
    """All singular values of a 2-D float matrix (any float dtype) in float64, on its device.

    From the eigenvalues of the smaller Gram matrix where they are well above rounding noise,
    else (rank-deficient matrices) from a float64 SVD.
    """
    eig = torch.linalg.eigvalsh(gram(matrix), UPLO="U")  # ascending
    top = float(eig[-1])
    noise = _NOISE_MARGIN * eig.shape[0] * torch.finfo(torch.float64).eps * top
    # The second bound keeps the 1e-12 cut exact: no kept value may be a rounding artefact.
    if float(eig[0]) > max(noise, (10 * THRESHOLD) ** 2):
        return eig.sqrt()
    return torch.linalg.svdvals(matrix.to(torch.float64))


def gram(matrix: torch.Tensor) -> torch.Tensor:
    """The upper triangle of the smaller Gram matrix, A Aᵀ or Aᵀ A, in float64.

    It is summed over slices of A's longer side, so A never exists whole in float64 (that copy
    of an embedding can be gigabytes). Only blocks on and above the diagonal are computed,
    close to half the work of a full product; the eigensolver reads nothing else.
    """
    x = matrix if matrix.shape[0] <= matrix.shape[1] else matrix.T
    side = x.shape[0]
    result = torch.zeros(side, side, dtype=torch.float64, device=x.device)
    # Up to 8 row blocks, none under 256 rows: smaller ones would slow the products more
    # than they save.
    block = -(-side // min(8, max(1, side // 256)))
    step = max(1, _SLICE // side)
    for start in range(0, x.shape[1], step):
        part = x[:, start : start + step].to(torch.float64)
        for row in range(0, side, block):
            result[row : row + block, row:].addmm_(part[row : row + block], part[row:].T)
    return result


def matrix_ner(matrix: np.ndarray | torch.Tensor, *, normalize: Normalize = "none") -> float:
    """NER of one matrix (any float dtype), min-max normalised first if asked."""
    a = torch.as_tensor(matrix)
    if normalize == "minmax":
        a = a.to(torch.float64)
        low, high = a.min(), a.max()
        # A constant matrix maps to zeros (no singular values): NER 0, not a division by zero.
        a = (a - low) / (high - low) if high > low else torch.zeros_like(a)
    return ner_of(singular_values(a).cpu())


def score_tensor(info: TensorInfo, *, normalize: Normalize, device: str) -> float:
    """NER of one stored 2-D tensor, read from its file onto `device` in its stored dtype."""
    return matrix_ner(read_tensor(info).to(device), normalize=normalize)


def cache_dir() -> Path:
    """`$HUBMERGE_CACHE/ner`, else `~/.cache/hubmerge/ner`."""
    root = os.environ.get("HUBMERGE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "hubmerge") / "ner"


def score_tensors(
    infos: Iterable[TensorInfo],
    *,
    normalize: Normalize,
    device: str,
    cache: Path | None,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
) -> dict[TensorInfo, float]:
    """NER of every tensor in `infos`, from the cache where it is there, else computed.

    Each worker reads one tensor at a time; each file's scores are saved to `cache` (None: no
    cache) as soon as that file is done, so an interrupted run keeps its work.
    `progress(description, total)` returns the function called after each computed matrix.
    """
    by_file: dict[Path, list[TensorInfo]] = {}
    for info in infos:
        by_file.setdefault(info.file, []).append(info)
    entries = {file: _CacheEntry(file, normalize, cache) for file in by_file}
    todo = {
        file: [i for i in tensors if i.name not in entries[file].scores]
        for file, tensors in by_file.items()
    }
    # Largest first, so that no worker is left with a big matrix while the others idle.
    queue = sorted((i for t in todo.values() for i in t), key=lambda i: -i.nbytes)
    remaining = {file: len(tensors) for file, tensors in todo.items()}
    step = progress("scoring NER", len(queue)) if progress and queue else None
    with _workers(device) as pool:
        scores = pool.map(lambda i: score_tensor(i, normalize=normalize, device=device), queue)
        for info, score in zip(queue, scores, strict=True):
            entries[info.file].scores[info.name] = score
            remaining[info.file] -= 1
            if not remaining[info.file]:
                entries[info.file].save()
            if step:
                step()
    return {info: entries[f].scores[info.name] for f, infos in by_file.items() for info in infos}


@contextlib.contextmanager
def _workers(device: str) -> Iterator[ThreadPoolExecutor]:
    """One single-threaded worker per CPU thread torch would use; one worker for a GPU.

    torch's thread count is process-wide, so it is restored when scoring ends.
    """
    threads = torch.get_num_threads()
    cpu = torch.device(device).type == "cpu"
    if cpu:
        torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads if cpu else 1) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


class _CacheEntry:
    """The cached scores of one model file: {tensor name: NER}, valid for its size and mtime."""

    def __init__(self, file: Path, normalize: Normalize, root: Path | None) -> None:
        resolved = file.resolve()  # Hub snapshots link to blobs: key the real file
        stat = resolved.stat()
        where = {"file": str(resolved), "normalize": normalize, "version": _CACHE_VERSION}
        # One entry per file and mode, named without size and mtime: a rewritten file replaces
        # its stale entry instead of leaving it behind.
        digest = hashlib.sha256(json.dumps(where, sort_keys=True).encode()).hexdigest()
        self.path = root / f"{digest[:32]}.json" if root else None
        self.key = where | {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        self.scores: dict[str, float] = {}
        if self.path is not None:
            try:
                data = json.loads(self.path.read_text())
                if data.get("key") == self.key:
                    self.scores = {str(k): float(v) for k, v in data["scores"].items()}
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass  # no entry, or an unreadable one: score again

    def save(self) -> None:
        """Write atomically (a concurrent run reads the old entry or the new one, never half);
        a cache that cannot be written only costs a later run the time to score again."""
        if self.path is None:
            return
        with contextlib.suppress(OSError):
            atomic_write(self.path, json.dumps({"key": self.key, "scores": self.scores}))
