"""Model cards for merged models: Hub metadata, lineage, recipe, layer map and evaluation results.

`hubmerge merge` writes `README.md` and `layer_map.svg` into every output (unless `--no-card`);
`hubmerge card` re-renders them, with lm-eval results, another template, or `--check` for CI.
Nothing here imports torch or transformers, so a card costs milliseconds.
"""

from hubmerge.card.donors import SOURCES_FILE, sources_json
from hubmerge.card.facts import NER_HEATMAP_FILE
from hubmerge.card.layermap import LAYER_MAP_FILE
from hubmerge.card.render import CARD_FILE, check_card, render_card, write_card

#: The card and the images it shows: what `hubmerge publish --card-only` uploads.
CARD_FILES = (CARD_FILE, LAYER_MAP_FILE, NER_HEATMAP_FILE)

__all__ = [
    "CARD_FILE",
    "CARD_FILES",
    "LAYER_MAP_FILE",
    "SOURCES_FILE",
    "check_card",
    "render_card",
    "sources_json",
    "write_card",
]
