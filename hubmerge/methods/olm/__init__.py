"""OLM (Optimal Layer Merging): choose each layer by how the merged model scores on data.

A working model starts as the base (configured, or the candidate that scores best on the
datasets). For each layer position, in `forward` or `backward` order, every candidate there
(each pool model's layer, and on request the mean and task-arithmetic blends of the pool's
layers) is tried in place and scored on every dataset; the best one stays (`search.py`).
The result is a plan like every other method's: layer i is the winner's layer i, a blended
layer the weighted sum of the pool's layers i, which the recipe writes as mergekit `linear`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from hubmerge.config import OlmConfig
from hubmerge.methods.base import Context, Method, Planned
from hubmerge.methods.olm.card import card_section
from hubmerge.plan import EdgePlan, LayerBlend, LayerPlan, MergePlan, edge_tensors
from hubmerge.sources import ModelSource

if TYPE_CHECKING:
    from hubmerge.methods.olm.search import SearchResult

#: The parts of a layer that `granularity: module` chooses separately.
PARTS = ("attention", "mlp")


def part_of(suffix: str) -> str:
    """`self_attn.q_proj.weight` -> attention; `mlp.up_proj.weight` -> mlp. The norm before each
    sub-block goes with it (`input_layernorm` with attention, the other norms with the MLP)."""
    return "attention" if "attn" in suffix or suffix.startswith("input_layernorm") else "mlp"


def plan(config: OlmConfig, sources: Mapping[str, ModelSource], context: Context) -> Planned:
    """Run (or resume) the search; the plan of its winners and the report of every score."""
    from hubmerge.methods.olm.search import search  # imports torch: only when OLM runs

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
    return Planned(olm_plan(config, result, sources), (result.report,))


def olm_plan(
    config: OlmConfig, result: SearchResult, sources: Mapping[str, ModelSource]
) -> MergePlan:
    """The plan of a finished search: each position's winner, blends as weighted layers."""
    base = result.candidates[result.base]
    donor = base.terms[0][0]
    layers = []
    for index, suffixes in enumerate(sources[donor].layers):
        choices: dict[str, tuple[str, int]] = {}
        blends: dict[str, LayerBlend] = {}
        for suffix in suffixes:
            part = part_of(suffix) if config.granularity == "module" else None
            winner = result.candidates[result.winners[(index, part)]]
            if winner.model is not None:
                choices[suffix] = (winner.model, index)
            else:
                blends[suffix] = tuple((m, index, w) for m, w in winner.terms)
        layers.append(LayerPlan.from_choices(choices, blends))
    edges: dict[bool, EdgePlan] = {}
    for pre in (True, False):
        names = edge_tensors(sources[donor], pre=pre)
        edges[pre] = EdgePlan(donor, blends={} if base.model else dict.fromkeys(names, base.terms))
    used = {m for c in [base, *(result.candidates[w] for w in result.winners.values())]
            for m, _ in c.terms}  # fmt: skip
    return MergePlan(
        "olm",
        layers,
        edges[True],
        edges[False],
        donor,
        donor,
        dtype=config.dtype,
        out_dtype=config.out_dtype,
        models=[donor, *(m for m in config.referenced_models() if m in used and m != donor)],
    )


METHOD = Method("olm", OlmConfig, planner=plan, card_key="olm", card=card_section)
