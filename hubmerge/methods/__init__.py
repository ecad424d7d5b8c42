"""Merge methods, and their one registry.

Each method is one module (or package) that exposes `METHOD`, a `base.Method`: its config model,
its planner (config and opened sources -> a `MergePlan` and the reports to write beside it), an
optional preview planner (the plan from the models' configs alone, for the Space) and its
section of the model card. `config.parse_config`, `merge.merge` and the card renderer find
methods here; adding a method is its module and one line in `REGISTRY`.

Modules are imported when asked for, so that naming the methods costs nothing and a card or a
config never imports a method's heavy parts (each method imports those inside its planner).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hubmerge.methods.base import Method

#: `merge_method` -> the module that exposes its `METHOD`: the methods hubmerge plans itself.
REGISTRY: dict[str, str] = {
    "passthrough": "hubmerge.methods.passthrough",
    "block_expansion": "hubmerge.methods.block_expansion",
    "olm": "hubmerge.methods.olm",
    "ner": "hubmerge.methods.ner",
    "linear": "hubmerge.methods.linear",
}
#: Every other `merge_method` is mergekit's to compute (or refuse).
MERGEKIT = "hubmerge.methods.mergekit_run"
#: The names of the methods hubmerge plans itself, in the order errors list them.
NAMES = tuple(REGISTRY)


def get(name: str) -> Method:
    """The method `name`; mergekit's bridge for any name hubmerge does not plan itself."""
    module: Any = importlib.import_module(REGISTRY.get(name, MERGEKIT))
    method: Method = module.METHOD
    return method


def for_config(config: Any) -> Method:
    """The method a validated config is for (by its model: a weighted `linear` is mergekit's)."""
    return next(m for m in every() if isinstance(config, m.config))


def every() -> list[Method]:
    """Every method, hubmerge's own first, then mergekit's bridge."""
    return [get(name) for name in NAMES] + [get("")]
