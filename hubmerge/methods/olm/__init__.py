"""OLM (Optimal Layer Merging): choose each layer by how the merged model scores on data.

A working model starts as the base (configured, or the pool model that ranks best on the
datasets). For each layer position, in `forward` or `backward` order, every pool model's layer
at that position is tried in place and scored on every dataset; the best-ranked one stays.
The result is a plan like every other method's: layer i comes from the winner's layer i.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

from hubmerge.config import OlmConfig
from hubmerge.plan import LayerPlan, MergePlan
from hubmerge.sources import ModelSource

if TYPE_CHECKING:
    from hubmerge.merge import MergeContext


def plan(config: OlmConfig, sources: Mapping[str, ModelSource], context: MergeContext) -> MergePlan:
    from hubmerge.methods.olm.report import REPORT_FILE
    from hubmerge.methods.olm.search import search

    reporter = context.reporter
    result = search(
        config,
        sources,
        device=context.device or config.device or "cpu",
        state=context.work_dir,
        restart=context.restart,
        progress=reporter.progress if reporter else None,
        log=reporter.log if reporter else None,
    )
    if context.staging is not None:
        (context.staging / REPORT_FILE).write_text(json.dumps(result.report, indent=2) + "\n")
    used = [m for m in config.models if m in result.winners and m != result.base]
    return MergePlan.from_base(
        "olm",
        result.base,
        [LayerPlan(model, index) for index, model in enumerate(result.winners)],
        dtype=config.dtype,
        out_dtype=config.out_dtype,
        models=[result.base, *used],
    )
