"""`layer_map.svg`: the layer map as a picture, one row per output layer coloured by its donor.

Written by hand as text (no plotting library) because every merge writes it: it costs
microseconds, and the same plan gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from xml.sax.saxutils import escape

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
_ROW, _BAR, _FONT = 16, 56, "font-family='monospace' font-size='11'"
#: The fill of a row whose tensors come from several models (a blend).
_MIXED = "#d9d9d9"
#: Width of one character of the 11 px monospace font (0.6 em, rounded up): the picture is
#: sized to its longest text, so no label or module list is cut off.
_CHAR = 7


def layer_map_svg(rows: Sequence[tuple[str, str, str, str]], donors: Sequence[str]) -> str:
    """An SVG of (output, donor name, source layer, scales) rows; `donors` fixes the colours."""
    colour = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(donors)}
    top = (len(donors) + 1) * _ROW  # the legend, a row per donor, then a blank row
    height = top + len(rows) * _ROW + 4
    details = [donor if scales == "1.0" else f"{donor}  {scales}" for _, donor, _, scales in rows]
    label = 8 + _CHAR * max((len(output) for output, *_ in rows), default=0)
    width = 8 + max(
        [22 + _CHAR * len(name) for name in donors]
        + [label + _BAR + 6 + _CHAR * len(detail) for detail in details]
    )
    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' {_FONT}>",
        f"<rect width='{width}' height='{height}' fill='#ffffff'/>",
    ]
    for i, name in enumerate(donors):
        y = i * _ROW + 2
        parts.append(f"<rect x='4' y='{y}' width='12' height='12' fill='{colour[name]}'/>")
        parts.append(f"<text x='22' y='{y + 10}'>{escape(name)}</text>")
    middle = label + _BAR // 2
    for i, ((output, donor, layer, _), detail) in enumerate(zip(rows, details, strict=True)):
        y = top + i * _ROW
        parts.append(
            f"<text x='{label - 4}' y='{y + 11}' text-anchor='end'>{escape(output)}</text>"
        )
        parts.append(
            f"<rect x='{label}' y='{y + 1}' width='{_BAR}' height='{_ROW - 2}' "
            f"fill='{colour.get(donor, _MIXED)}'/>"
        )
        parts.append(f"<text x='{middle}' y='{y + 11}' text-anchor='middle'>{escape(layer)}</text>")
        parts.append(f"<text x='{label + _BAR + 6}' y='{y + 11}'>{escape(detail)}</text>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
