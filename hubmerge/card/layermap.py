"""`layer_map.svg`: the layer map as a picture, one row per output layer coloured by its donor.

Written by hand as text (no plotting library) because every merge writes it: it costs
microseconds, and the same plan gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from xml.sax.saxutils import escape

LAYER_MAP_FILE = "layer_map.svg"

#: Tableau 10: distinct, colour-blind-friendly hues; donors beyond ten reuse them in order.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
_ROW, _LABEL, _BAR, _WIDTH, _FONT = 16, 44, 56, 520, "font-family='monospace' font-size='11'"


def layer_map_svg(rows: Sequence[tuple[str, str, str, str]], donors: Sequence[str]) -> str:
    """An SVG of (output, donor name, source layer, scales) rows; `donors` fixes the colours."""
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(donors)}
    top = (len(donors) + 1) * _ROW  # the legend, a row per donor, then a blank row
    height = top + len(rows) * _ROW + 4
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{_WIDTH}' height='{height}' "
        f"viewBox='0 0 {_WIDTH} {height}' {_FONT}>",
        f"<rect width='{_WIDTH}' height='{height}' fill='#ffffff'/>",
    ]
    for i, name in enumerate(donors):
        y = i * _ROW + 2
        parts.append(f"<rect x='4' y='{y}' width='12' height='12' fill='{colour[name]}'/>")
        parts.append(f"<text x='22' y='{y + 10}'>{escape(name)}</text>")
    middle = _LABEL + _BAR // 2
    for i, (output, donor, layer, scales) in enumerate(rows):
        y = top + i * _ROW
        detail = donor if scales == "1.0" else f"{donor}  {scales}"
        parts.append(
            f"<text x='{_LABEL - 4}' y='{y + 11}' text-anchor='end'>{escape(output)}</text>"
        )
        parts.append(
            f"<rect x='{_LABEL}' y='{y + 1}' width='{_BAR}' height='{_ROW - 2}' "
            f"fill='{colour[donor]}'/>"
        )
        parts.append(f"<text x='{middle}' y='{y + 11}' text-anchor='middle'>{escape(layer)}</text>")
        parts.append(f"<text x='{_LABEL + _BAR + 6}' y='{y + 11}'>{escape(detail)}</text>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
