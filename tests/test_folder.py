"""The output folder's module: light imports, one atomic write, typed reports, publishable names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hubmerge import methods
from hubmerge.config import MergekitConfig, parse_config
from hubmerge.folder import (
    Donor,
    NerReport,
    PublicNames,
    atomic_write,
    partial_name,
    read_report,
    sources_json,
)
from tests.helpers import run_cli, write_yaml

#: What publishing, cards and `hubmerge run` (before its merge stage) must not load.
HEAVY = (
    "torch",
    "transformers",
    "matplotlib",
    "mergekit",
    "hubmerge.merge",
    "hubmerge.writer",
    "hubmerge.methods.olm.search",
    "hubmerge.methods.olm.evaluate",
    "hubmerge.methods.ner.scores",
)


@pytest.mark.parametrize("module", ["hubmerge.hub", "hubmerge.card", "hubmerge.run"])
def test_publishing_cards_and_runs_do_not_import_the_merge_engine(module: str) -> None:
    """Importing the module and parsing a config of every method (which asks the registry)
    loads none of the merge engine, torch or a method's heavy parts."""
    code = (
        f"import sys, {module}\n"
        "from hubmerge import methods\n"
        "from hubmerge.config import parse_config\n"
        "methods.every()\n"
        "parse_config({'merge_method': 'passthrough', 'slices': "
        "[{'sources': [{'model': 'a', 'layer_range': [0, 1]}]}]}, 'c')\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_registry_names_every_method_once() -> None:
    """config, merge and the card find each method in one place: its module's `METHOD`."""
    names = [m.name for m in methods.every()]
    assert names == [*methods.NAMES, "mergekit"]
    for name in methods.NAMES:
        assert methods.get(name).name == name
    assert methods.get("slerp").config is MergekitConfig  # anything else is mergekit's
    config = parse_config({"merge_method": "block_expansion", "model": "m", "append": 1}, "c")
    assert methods.for_config(config).name == "block_expansion"


def test_atomic_write_replaces_whole_files_and_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "deep" / "report.json"
    atomic_write(target, "old\n")
    atomic_write(target, b"new\n")
    assert target.read_bytes() == b"new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]

    def fail(src: object, dst: object) -> None:
        assert Path(str(src)).name == partial_name("report.json", os.getpid())
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)  # killed between writing and renaming
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, "newer\n")
    assert target.read_bytes() == b"new\n"  # the old file, whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_one_rule_names_local_donors_in_data_and_in_text(tmp_path: Path) -> None:
    """The card (data) and publishing (file text) turn the same references into the same names."""
    local = str(tmp_path / "models" / "my-model")
    donors = {
        local: Donor("my-model", False, None, None, (), ()),
        "acme/hub-model": Donor("acme/hub-model", True, "abc", None, (), ()),
    }
    names = PublicNames(donors, tmp_path / "out")
    assert names.model(local) == "my-model" and names.model("acme/hub-model") == "acme/hub-model"
    data = {"models": [local, "acme/hub-model"], "data": "/home/someone/private/add.json"}
    assert names.public(data) == {"models": ["my-model", "acme/hub-model"], "data": "add.json"}
    text = json.dumps({"model": local, "out": str((tmp_path / "out").absolute())})
    assert names.text(text) == json.dumps({"model": "my-model", "out": "out"})
    # A longer name that starts with a donor's reference is another model: left alone.
    assert names.text(f"{local}-v2") == f"{local}-v2"


def test_the_ner_report_round_trips_through_its_type(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report a NER merge writes is exactly what its type reads back and writes again; a
    dry run writes nothing at all; the heatmap is drawn from the report with the card."""
    monkeypatch.setenv("HUBMERGE_CACHE", str(tmp_path / "cache"))
    config = {
        "merge_method": "ner",
        "base_model": str(models["llama"]),
        "models": [str(models["llama"]), str(models["llama_b"])],
        "granularity": "module",
    }
    path = write_yaml(tmp_path / "ner.yaml", config)
    assert run_cli("merge", path, tmp_path / "dry", "--dry-run").exit_code == 0
    assert not (tmp_path / "dry").exists()
    assert run_cli("merge", path, tmp_path / "out", "--no-card").exit_code == 0
    assert not (tmp_path / "out" / "ner_heatmap.png").exists()
    assert run_cli("card", tmp_path / "out").exit_code == 0
    assert "(ner_heatmap.png)" in (tmp_path / "out" / "README.md").read_text()
    written = json.loads((tmp_path / "out" / "ner_report.json").read_text())
    report = read_report(tmp_path / "out", NerReport)
    assert report is not None and report.to_json() == written
    assert report.granularity == "module" and all(layer.modules for layer in report.layers)
    # The recipe in the report is the one the folder carries (computed once).
    from hubmerge.recipe import read_recipe

    assert report.recipe == read_recipe(tmp_path / "out")
    assert (tmp_path / "out" / "ner_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_the_sources_record_round_trips(tmp_path: Path) -> None:
    donors = {"a": Donor("a", False, None, "mit", ("en",), ("org/base",))}
    (tmp_path / "hubmerge_sources.json").write_text(sources_json(donors))
    assert PublicNames.of(tmp_path).donors == donors


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("merge_report.json", {"layers": []}, "merge_report.json: not an OLM report"),
        ("ner_report.json", {"models": ["a"]}, "ner_report.json: not a NER report"),
        ("hubmerge_mergekit.json", [], "hubmerge_mergekit.json: not a mergekit report"),
    ],
)
def test_a_malformed_report_is_one_line_naming_the_file(
    models: dict[str, Path], tmp_path: Path, name: str, content: object, message: str
) -> None:
    config = {"merge_method": "block_expansion", "model": str(models["llama"]), "append": 1}
    out = tmp_path / "out"
    path = write_yaml(tmp_path / "c.yaml", config)
    assert run_cli("merge", path, out, "--no-card").exit_code == 0
    (out / name).write_text(json.dumps(content))
    result = run_cli("card", out)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.output


def test_what_a_killed_write_leaves_is_never_uploaded(tmp_path: Path) -> None:
    from hubmerge.hub import upload_files

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    leftovers = [partial_name(n, 123) for n in (".hubmerge_run.json", "merge_report.json")]
    assert leftovers == [".hubmerge_run.json.partial-123", ".merge_report.json.partial-123"]
    for name in leftovers:
        (tmp_path / name).write_text("half")
    assert [f.path for f in upload_files(tmp_path)] == ["config.json", "model.safetensors"]
