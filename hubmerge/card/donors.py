"""What a card says about the models a merge read, recorded while they are open.

`hubmerge merge` writes `hubmerge_sources.json` (a `folder.Donor` per source) beside the
weights: for each source, the name a card shows (a Hub id, or a local folder's name: never a
path), whether it is on the Hub (only Hub models become `base_model`), the Hub commit that was
read, and the license, languages and `base_model` of the source's own card (its README.md; for
a Hub id the one in the snapshot, downloaded with the support files). Recording this at merge
time makes the card a function of the model folder alone, so `hubmerge card --check` answers the
same in CI, where the sources are not at hand and the Hub may not be reachable.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.repocard import metadata_load

from hubmerge.folder import Donor
from hubmerge.sources import ModelSource, is_hub_id


def describe_sources(sources: Mapping[str, ModelSource]) -> dict[str, Donor]:
    """Each source's `Donor`, keyed by its reference: the sources record of a merge."""
    return {ref: describe(source) for ref, source in sources.items()}


def describe(source: ModelSource) -> Donor:
    """The card's view of an opened source: its name, Hub origin and its own card's metadata."""
    hub = is_hub_id(source.ref)
    meta = _card_metadata(source.file("README.md") or source.path / "README.md")
    bases = meta.get("base_model")
    return Donor(
        name=source.name,
        hub=hub,
        revision=source.path.name if hub else None,
        license=meta.get("license") if isinstance(meta.get("license"), str) else None,
        language=_strings(meta.get("language")),
        # Only Hub ids: a path in a hand-written card would say nothing to a reader elsewhere.
        base_model=tuple(b for b in _strings(bases) if is_hub_id(b)),
    )


def _card_metadata(readme: Path) -> dict[str, Any]:
    """A README's YAML front matter; empty when there is none or it does not parse.

    A donor's broken card must not stop a merge: its license and lineage are then unknown, which
    the card reports as such (license unknown, no lineage).
    """
    try:
        data = metadata_load(readme)
    except (OSError, ValueError, yaml.YAMLError):
        return {}
    return data or {}


def _strings(value: Any) -> tuple[str, ...]:
    """A card field that may be one string or a list of them, as a tuple of strings."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(v for v in value if isinstance(v, str))
    return ()
