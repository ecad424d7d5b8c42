"""What a page shows of a merged model: its card, and the files it offers for download."""

from __future__ import annotations

import base64
import re
from pathlib import Path

from hubmerge.card import CARD_FILE, LAYER_MAP_FILE
from hubmerge.hub import upload_files

#: Above this the weights are not offered for download (copying them for the browser would
#: double the disk they take): publish them instead.
DOWNLOAD_LIMIT = 2 * 10**9


def card_markdown(model_dir: Path) -> str:
    """The model card as a page shows it: its metadata as a YAML block, the layer map inline.

    A Markdown view would take the `---` block for a rule and a heading, and cannot follow the
    card's relative link to `layer_map.svg`, so the picture goes in as a data URI.
    """
    text = (model_dir / CARD_FILE).read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?\n)---\n(.*)", text, re.DOTALL)
    metadata, body = (match.group(1), match.group(2)) if match else ("", text)
    svg = model_dir / LAYER_MAP_FILE
    if svg.is_file():
        data = base64.b64encode(svg.read_bytes()).decode()
        body = body.replace(f"]({LAYER_MAP_FILE})", f"](data:image/svg+xml;base64,{data})")
    return f"```yaml\n{metadata}```\n{body}" if metadata else body


def download_files(model_dir: Path, limit: int = DOWNLOAD_LIMIT) -> list[Path]:
    """The files a page offers for download: what publishing uploads, without the weights when
    they weigh more than `limit` bytes.
    """
    files = upload_files(model_dir)
    if sum(f.size for f in files) > limit:
        files = tuple(f for f in files if not f.path.endswith(".safetensors"))
    return [model_dir / f.path for f in files]
