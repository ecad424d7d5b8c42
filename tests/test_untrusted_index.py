"""Crafted model folders: every file hubmerge opens must be the model's own.

A shard index (`model.safetensors.index.json`) or a link in the folder that points elsewhere
(an absolute path, `..`, a link out of the folder) is refused before anything is read from the
file it names, in one line that quotes nothing of that file; the Hub cache's own links (snapshot
files into the repo's `blobs/`) are not "elsewhere".
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from hubmerge.errors import SourceError
from hubmerge.sources import ModelSource
from tests.helpers import run_cli, tensors, write_yaml
from tests.test_bad_input import assert_refused


def copy_model(models: dict[str, Path], tmp_path: Path, name: str = "crafted") -> Path:
    return Path(shutil.copytree(models["llama"], tmp_path / name))


def write_index(model: Path, weight_map: Any, **extra: Any) -> None:
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map} | extra
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def indexed(model: Path, shard: str) -> dict[str, str]:
    """A weight map of the model's real tensors, every one in `shard`."""
    return dict.fromkeys(tensors(model), shard)


def expand(tmp_path: Path, model: str = "crafted") -> Path:
    return write_yaml(
        tmp_path / "c.yaml", {"merge_method": "block_expansion", "model": model, "append": 1}
    )


@pytest.mark.parametrize(
    ("shard", "needle"),
    [
        ("OTHER", "is not a plain name inside the model folder"),  # an absolute path
        ("../other/model.safetensors", "is not a plain name inside the model folder"),
        ("sub/../../other/model.safetensors", "is not a plain name inside the model folder"),
        ("/etc/passwd", "is not a plain name inside the model folder"),
        ("", "is not a plain name inside the model folder"),
        ("a\\..\\b", "is not a plain name inside the model folder"),
    ],
)
def test_index_names_outside_the_folder_are_refused(
    models: dict[str, Path], tmp_path: Path, shard: str, needle: str
) -> None:
    model = copy_model(models, tmp_path)
    other = copy_model(models, tmp_path, "other")
    shard = shard.replace("OTHER", str(other / "model.safetensors"))
    write_index(model, indexed(model, "model.safetensors") | {"lm_head.weight": shard})
    assert_refused(tmp_path, expand(tmp_path), "crafted: file name", needle)


def test_the_file_named_outside_is_never_quoted(models: dict[str, Path], tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:TOPSECRET\n")
    model = copy_model(models, tmp_path)
    write_index(model, {"lm_head.weight": str(secret)})
    result = run_cli("merge", expand(tmp_path), tmp_path / "out")
    assert result.exit_code == 2 and "TOPSECRET" not in result.output
    assert "root:x" not in result.output


@pytest.mark.parametrize("kind", ["shard", "tokenizer", "config"])
def test_links_out_of_the_folder_are_refused(
    models: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    model = copy_model(models, tmp_path)
    other = copy_model(models, tmp_path, "other")
    name = {"shard": "model.safetensors", "tokenizer": "tokenizer.json", "config": "config.json"}
    target = other / name[kind] if kind != "tokenizer" else tmp_path / "secret.txt"
    target.write_text("secret") if kind == "tokenizer" else None
    (model / name[kind]).unlink(missing_ok=True)
    (model / name[kind]).symlink_to(target)
    assert_refused(tmp_path, expand(tmp_path), f"crafted: '{name[kind]}' leads outside the model")


def test_a_link_inside_the_folder_is_fine(models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(models, tmp_path)
    (model / "weights").mkdir()
    (model / "model.safetensors").rename(model / "weights" / "w.safetensors")
    (model / "model.safetensors").symlink_to(Path("weights") / "w.safetensors")
    assert run_cli("merge", expand(tmp_path), tmp_path / "out").exit_code == 0


def test_a_hub_cache_snapshot_reads_its_blobs(models: dict[str, Path], tmp_path: Path) -> None:
    """A snapshot's files are links into the repo's blobs/, as huggingface_hub lays them out."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(models["llama"].iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    source = ModelSource.open(str(snapshot))
    assert len(source.layers) == 4 and source.tensors
    assert run_cli("merge", expand(tmp_path, str(snapshot)), tmp_path / "out").exit_code == 0


@pytest.mark.parametrize(
    ("index", "needle"),
    [
        ([], "has no weight_map"),
        ({"metadata": {}}, "has no weight_map"),
        ({"weight_map": []}, "has no weight_map"),
        ({"weight_map": {}}, "has no weight_map"),
        ({"weight_map": {"lm_head.weight": 7}}, "weight_map['lm_head.weight'] is not a file name"),
        ("{not json", "is not valid JSON"),
        (b"\xff\xfe{}", "is not UTF-8"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_malformed_indexes_are_refused(
    models: dict[str, Path], tmp_path: Path, index: Any, needle: str
) -> None:
    model = copy_model(models, tmp_path)
    path = model / "model.safetensors.index.json"
    if isinstance(index, bytes):
        path.write_bytes(index)
    elif isinstance(index, str):
        path.write_text(index)
    else:
        path.write_text(json.dumps(index))
    assert_refused(tmp_path, expand(tmp_path), "crafted: model.safetensors.index.json", needle)


def test_an_oversized_index_is_not_read(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("hubmerge.sources.MAX_INDEX_BYTES", 1000)
    model = copy_model(models, tmp_path)
    write_index(model, indexed(model, "model.safetensors"), padding="x" * 2000)
    assert_refused(tmp_path, expand(tmp_path), "index.json is over 1,000 bytes")


def test_a_tensor_in_two_shards_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(models, tmp_path)
    shutil.copy(model / "model.safetensors", model / "copy.safetensors")
    names = sorted(tensors(model))
    write_index(
        model,
        dict.fromkeys(names[:3], "model.safetensors")
        | dict.fromkeys(names[3:], "copy.safetensors"),
    )
    assert_refused(tmp_path, expand(tmp_path), "is in both copy.safetensors and model.safetensors")


def test_a_missing_shard_is_named(models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(models, tmp_path)
    write_index(model, indexed(model, "model.safetensors") | {"x": "model-2.safetensors"})
    assert_refused(tmp_path, expand(tmp_path), "shard 'model-2.safetensors' named in the index")


def test_a_fifo_is_not_a_file(models: dict[str, Path], tmp_path: Path) -> None:
    model = copy_model(models, tmp_path)
    os.mkfifo(model / "tokenizer.json")  # opening it would block forever
    assert_refused(tmp_path, expand(tmp_path), "crafted: 'tokenizer.json' is not a regular file")
    with pytest.raises(SourceError, match="'tokenizer.json' is not a regular file"):
        ModelSource.open(str(model))
