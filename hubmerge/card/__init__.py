"""Model cards for merged models: Hub metadata, lineage, recipe, layer map and evaluation results.

`hubmerge merge` writes `README.md` and `layer_map.svg` into every output (unless `--no-card`);
`hubmerge card` re-renders them, with lm-eval results, another template, or `--check` for CI.
Nothing here imports torch or transformers, nor the merge engine, so a card costs milliseconds.
"""

from hubmerge.card.render import check_card, render_card, write_card
from hubmerge.folder import CARD_FILE, CARD_FILES, LAYER_MAP_FILE

__all__ = [
    "CARD_FILE",
    "CARD_FILES",
    "LAYER_MAP_FILE",
    "check_card",
    "render_card",
    "write_card",
]
