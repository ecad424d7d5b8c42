"""What the wheel must carry for cards and evaluation: templates, task YAMLs, their data."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest
import yaml

from hubmerge.evals import TASKS_DIR

ROOT = Path(__file__).parent.parent


def test_every_package_is_listed() -> None:
    """pyproject lists packages by hand (see its comment): a folder with modules must be there."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / "hubmerge").rglob("*.py")
        if "models" not in path.relative_to(ROOT).parts
    }
    assert found - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"


def test_default_template_is_packaged() -> None:
    template = (files("hubmerge.card_templates") / "model_card.md").read_text("utf-8")
    assert template.startswith("---\n{{ card_data }}\n---\n")


class _TaskLoader(yaml.SafeLoader):
    """lm-eval's YAML with its `!function` tag read as plain text."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def test_shipped_tasks_name_data_that_ships() -> None:
    tasks = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        config = yaml.load(path.read_text(), Loader=_TaskLoader)
        if "task" in config and isinstance(config["task"], str):
            tasks[config["task"]] = config
            for name in config["dataset_kwargs"]["data_files"].values():
                assert (TASKS_DIR / name).is_file(), f"{path.name}: {name} is missing"
    assert set(tasks) == {f"hubmerge_zoo_{t}" for t in ("add", "reverse", "sort", "count")}
