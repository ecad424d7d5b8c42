"""The one streaming writer every plan goes through, and the atomic finish of an output folder.

Shard layouts are computed from headers before a byte is written, so each shard's header is
written first and its tensors are streamed after it: an unscaled tensor is copied file-to-file
by the kernel (`copy_file_range`), a scaled or cast one is computed alone in memory. Peak memory
is therefore about one tensor, whatever the model's size.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hubmerge import arch
from hubmerge.errors import ConfigError, OutputError, SourceError
from hubmerge.folder import INDEX_FILE, MODEL_CONFIG_FILE, json_text
from hubmerge.plan import MergePlan, OutputTensor
from hubmerge.sources import ModelSource
from hubmerge.tensorfile import (
    DTYPE_CODES,
    DTYPE_NAMES,
    ITEMSIZE,
    encode_header,
    pwrite_all,
    transform,
    weighted_sum,
)

_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_COPY_CHUNK = 1 << 26
#: Threads writing tensors: enough to overlap arithmetic with kernel copies on a small machine.
_WRITERS = min(4, os.cpu_count() or 1)


class Progress(Protocol):
    """What the writer reports while it works (the CLI shows it as a rich progress bar)."""

    def start(self, total_bytes: int, total_tensors: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


def parse_size(text: str) -> int:
    """`5GB` -> 5_000_000_000 (decimal suffixes as mergekit uses them; `GiB` is binary)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise ConfigError(f"--out-shard-size: cannot read {text!r} (use e.g. 5GB, 500MB)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size <= 0:
        raise ConfigError(f"--out-shard-size: {text!r} must be positive")
    return size


@dataclass(frozen=True)
class _Planned:
    tensor: OutputTensor
    compute: str
    out: str

    @property
    def raw(self) -> bool:
        return (
            not self.tensor.terms
            and self.tensor.scale == 1.0
            and self.tensor.source.dtype == self.compute == self.out
        )

    @property
    def nbytes(self) -> int:
        return self.tensor.source.nbytes // ITEMSIZE[self.tensor.source.dtype] * ITEMSIZE[self.out]


def write_model(
    plan: MergePlan,
    sources: Mapping[str, ModelSource],
    out_dir: Path,
    *,
    shard_size: int,
    progress: Progress | None = None,
) -> None:
    """Write the plan's weights, config and tokenizer into `out_dir` (an empty folder)."""
    planned = _lay_out(plan, sources)
    shards = _shard(planned, shard_size)
    if progress:
        progress.start(sum(p.nbytes for p in planned), len(planned))
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    with contextlib.ExitStack() as stack:
        source_fd = {
            path: stack.enter_context(path.open("rb")).fileno()
            for path in sorted({p.tensor.source.file for p in planned if p.raw})
        }
        jobs: list[tuple[_Planned, int, int]] = []  # (tensor, output fd, output offset)
        for name, shard in zip(names, shards, strict=True):
            out = stack.enter_context((out_dir / name).open("wb"))
            header = encode_header(
                [(p.tensor.name, p.out, p.tensor.source.shape, p.nbytes) for p in shard]
            )
            out.write(header)
            out.flush()
            offset = len(header)
            for p in shard:
                jobs.append((p, out.fileno(), offset))
                offset += p.nbytes

        def write(job: tuple[_Planned, int, int]) -> int:
            p, fd, offset = job
            if p.raw:
                _copy_range(
                    source_fd[p.tensor.source.file], fd, p.tensor.source.offset, offset, p.nbytes
                )
            elif p.tensor.terms:
                weighted_sum(p.tensor.terms, p.compute, p.out, fd, offset)
            else:
                transform(p.tensor.source, p.tensor.scale, p.compute, p.out, fd, offset)
            return p.nbytes

        # Every tensor's place in its shard is known, so tensors are written out of order by a
        # few threads: kernel copies and numpy arithmetic both release the GIL, and scaling one
        # tensor overlaps copying another. Each thread holds at most one arithmetic chunk.
        with ThreadPoolExecutor(max_workers=_WRITERS) as pool:
            for done in pool.map(write, jobs):
                if progress:
                    progress.advance(done)
    if len(shards) > 1:
        weight_map = {
            p.tensor.name: name for name, shard in zip(names, shards, strict=True) for p in shard
        }
        index = {
            "metadata": {"total_size": sum(p.nbytes for p in planned)},
            "weight_map": weight_map,
        }
        (out_dir / INDEX_FILE).write_text(json_text(index))
    _write_config(plan, sources, planned, out_dir)
    _copy_support_files(plan, sources, out_dir)


def output_size(plan: MergePlan, sources: Mapping[str, ModelSource]) -> int:
    """The bytes of weights `write_model` would write for `plan` (the Space's disk check)."""
    return sum(p.nbytes for p in _lay_out(plan, sources))


def _lay_out(plan: MergePlan, sources: Mapping[str, ModelSource]) -> list[_Planned]:
    compute_override = DTYPE_CODES[plan.dtype] if plan.dtype else None
    out_override = DTYPE_CODES[plan.out_dtype] if plan.out_dtype else None
    planned = []
    for tensor in plan.tensors(sources):
        compute = compute_override or tensor.source.dtype
        p = _Planned(tensor, compute, out_override or compute)
        for info in [t for t, _ in tensor.terms] or [tensor.source]:
            if not p.raw and info.dtype not in DTYPE_NAMES:
                raise SourceError(
                    f"{info.file}: tensor {info.name} is {info.dtype}, "
                    "which hubmerge cannot scale, cast or blend"
                )
            if compute_override is None and info.dtype != compute:
                # mergekit would cast every term to the first one's dtype: say so explicitly.
                raise ConfigError(
                    f"tensor {tensor.name} blends {info.dtype} with {compute} tensors: set dtype"
                )
        planned.append(p)
    return planned


def _shard(planned: list[_Planned], shard_size: int) -> list[list[_Planned]]:
    """Greedy in file order: a new shard starts when the next tensor would overflow this one."""
    shards: list[list[_Planned]] = [[]]
    size = 0
    for p in planned:
        if shards[-1] and size + p.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


def _copy_range(src: int, dst: int, src_offset: int, dst_offset: int, count: int) -> None:
    """Copy bytes file-to-file in the kernel where possible (no trip through user memory)."""
    try:
        while count:
            done = os.copy_file_range(src, dst, count, src_offset, dst_offset)
            if done == 0:
                raise OSError("source ended early")
            src_offset, dst_offset, count = src_offset + done, dst_offset + done, count - done
        return
    except (AttributeError, OSError):
        pass  # no kernel copy here (old kernel, other filesystem): copy through a buffer
    while count:
        chunk = os.pread(src, min(count, _COPY_CHUNK), src_offset)
        if not chunk:
            raise SourceError(f"fd {src}: file ended early (truncated while merging?)")
        dst_offset = pwrite_all(dst, chunk, dst_offset)
        src_offset, count = src_offset + len(chunk), count - len(chunk)


def _write_config(
    plan: MergePlan, sources: Mapping[str, ModelSource], planned: list[_Planned], out_dir: Path
) -> None:
    donor = sources[plan.donor].config
    dtype = plan.out_dtype or plan.dtype or arch.config_dtype(donor)
    if dtype is None:
        dtype = DTYPE_NAMES.get(planned[0].out, "float32")
    layer_sources = [(sources[layer.model].config, layer.layer) for layer in plan.layers]
    config = arch.rewrite_config(donor, layer_sources, dtype)
    (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _copy_support_files(plan: MergePlan, sources: Mapping[str, ModelSource], out_dir: Path) -> None:
    wanted = [(sources[plan.donor], "generation_config.json")]
    wanted += [(sources[plan.tokenizer], name) for name in arch.TOKENIZER_FILES]
    for source, name in wanted:
        if (path := source.file(name)) is not None:  # checked: a plain file of the model's
            shutil.copyfile(path, out_dir / name)


@contextlib.contextmanager
def staged_output(out_dir: Path, *, force: bool) -> Iterator[Path]:
    """A temporary sibling folder that becomes `out_dir` only if the block completes.

    A failed or interrupted merge removes its staging folder, and the parent folders it had to
    create; a killed one leaves only a hidden `.NAME.partial-PID` folder, never something that
    looks like a finished model. An existing `out_dir` is replaced only with `force`, and only
    at the end. Each output is written by one process at a time: the run holds a lock
    (`.NAME.lock`, removed when done) and a second run into the same folder is refused, so no
    run ever removes a live run's staging folder; the stale folders of runs that were killed
    (their process is gone) are cleared by the next run.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not force:
        raise OutputError(f"{out_dir}: already exists (pass --force to replace it)")
    created = _make_parents(out_dir)
    try:
        with _output_lock(out_dir):
            _clear_stale(out_dir)
            if out_dir.exists() and not force:  # a killed --force run's old model, restored
                raise OutputError(f"{out_dir}: already exists (pass --force to replace it)")
            if out_dir.exists() and not out_dir.is_dir():
                raise OutputError(f"{out_dir}: exists and is not a folder")
            staging = _sibling(out_dir, "partial", os.getpid())
            staging.mkdir()
            try:
                yield staging
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            if out_dir.exists():
                trash = _sibling(out_dir, "replaced", os.getpid())
                out_dir.rename(trash)
                staging.rename(out_dir)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                staging.rename(out_dir)
    except BaseException:
        for folder in created:  # deepest first; one a failed run left state in stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _sibling(out_dir: Path, kind: str, pid: int) -> Path:
    return out_dir.parent / f".{out_dir.name}.{kind}-{pid}"


def _make_parents(out_dir: Path) -> list[Path]:
    """Create `out_dir`'s missing parent folders; the ones created, deepest first."""
    missing = []
    existing = out_dir.parent
    while not existing.exists() and not existing.is_symlink():
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"{out_dir}: cannot be created: {existing} is a file, not a folder")
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except OSError as e:
            for made in missing[missing.index(folder) + 1 :]:
                with contextlib.suppress(OSError):
                    made.rmdir()
            raise OutputError(f"{out_dir}: cannot create {folder} ({e.strerror})") from None
    return missing


@contextlib.contextmanager
def _output_lock(out_dir: Path) -> Iterator[None]:
    """Hold `.NAME.lock` (an exclusive `flock`) while `out_dir` is written; refuse if taken."""
    import fcntl

    lock = out_dir.parent / f".{out_dir.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{out_dir}: cannot write next to it ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            by = f" (process {owner})" if owner.isdigit() else ""
            raise OutputError(
                f"{out_dir}: another hubmerge run{by} is writing it right now; "
                "wait for it to finish"
            ) from None
        # Its last holder removes the file on the way out: if it did so after we opened it,
        # the lock we hold is on a file nobody else sees, so lock the one now there.
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _clear_stale(out_dir: Path) -> None:
    """Remove what killed runs into `out_dir` left (the lock is held: none of them is live).

    A run killed between moving the old model aside and moving the new one in leaves no
    `out_dir` and the old model complete in `.NAME.replaced-PID`: that one is put back.
    """
    for kind in ("replaced", "partial"):
        for stale in out_dir.parent.glob(f".{out_dir.name}.{kind}-*"):
            pid = stale.name.rpartition("-")[2]
            if not pid.isdigit() or _alive(int(pid)):
                continue  # not hubmerge's, or (pid reused by another program) left alone
            if kind == "replaced" and not out_dir.exists():
                stale.rename(out_dir)
            else:
                shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process holds the lock: a folder with its pid is an old one's
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # another user's process
        return True
    return True
