"""The bounds on what an untrusted model or config may ask for, in one place.

Each is far above any real model (the largest published ones have a few hundred layers and
headers of a few megabytes) and far below what would exhaust a machine, so a hostile or broken
input is refused in a fraction of a second, before anything is allocated or planned, instead of
running for minutes or out of memory (on the Space, for every visitor at once).
"""

from __future__ import annotations

#: Layers of one model (`num_hidden_layers`), and of a merge's output.
MAX_LAYERS = 10_000
#: A safetensors header (the official library's own limit).
MAX_HEADER_BYTES = 100_000_000
#: A model's `config.json` (real ones are a few kilobytes).
MAX_CONFIG_JSON_BYTES = 10_000_000
#: `model.safetensors.index.json` (a few megabytes for the largest sharded models).
MAX_INDEX_BYTES = 100_000_000
#: A merge config (YAML): seed-sized configs are a few kilobytes.
MAX_CONFIG_BYTES = 1_000_000
#: Values in a merge config once YAML aliases are expanded, and how deeply they may nest.
MAX_CONFIG_NODES = 1_000_000
MAX_CONFIG_DEPTH = 64
#: Values in one scale or weight gradient.
MAX_GRADIENT = 1_000
#: Largest magnitude of a scale or weight: beyond it float32 arithmetic overflows to inf.
MAX_SCALE = 3.4028234663852886e38
#: An evaluation dataset file (OLM's reference datasets are a few megabytes in all), checked
#: before a Hub dataset file is downloaded and before any file is read.
MAX_DATASET_BYTES = 100_000_000
