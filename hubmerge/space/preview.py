"""What can be known of a merge before any weights are downloaded: its models and its plan.

Hub models cost one `config.json` each (`config_source`); local folders, allowed off a shared
Space, are read as the merge reads them, headers only. Methods whose layer map follows from the
models' configs are planned on them (`planner_for`); NER reads the weights and OLM runs the
model, so their layer maps exist only after the merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hubmerge import arch, methods
from hubmerge.config import MergeConfig
from hubmerge.errors import SourceError
from hubmerge.methods.base import PreviewPlanner
from hubmerge.plan import MergePlan
from hubmerge.sources import CONFIG_PATTERNS, ModelSource, fetch, is_hub_id, read_config, read_index
from hubmerge.tensorfile import DTYPE_CODES, ITEMSIZE, TensorInfo


def planner_for(config: MergeConfig) -> PreviewPlanner | None:
    """The planner that maps `config`'s layers from its models' configs alone, if its method
    has one (the registry's `preview`; mergekit's gives lineage and depth only, which bounds the
    output's size for the disk check, and the page shows its parameters instead of a layer map).
    """
    return methods.for_config(config).preview


@dataclass(frozen=True)
class Preview:
    """What can be known before downloading weights: the models, and the plan where it is fixed."""

    sources: dict[str, ModelSource]
    #: None for methods that decide the layer map while merging (NER, OLM).
    plan: MergePlan | None

    def output_bound(self, out_dtype: str | None) -> int:
        """Bytes of weights the merge will write, or a bound where the plan is not known yet.

        NER and OLM keep the depth of their pool, so the largest model, in the output dtype,
        bounds their output.
        """
        if self.plan is not None:
            from hubmerge.writer import output_size

            return output_size(self.plan, self.sources)
        itemsize = ITEMSIZE[DTYPE_CODES[out_dtype]] if out_dtype else 0
        return max(
            sum(max(t.nbytes, t.nbytes // ITEMSIZE[t.dtype] * itemsize) for t in s.tensors.values())
            for s in self.sources.values()
        )


def preview(config: MergeConfig) -> Preview:
    """The models as their configs describe them, checked for compatibility, and the plan."""
    from hubmerge.merge import check_compatible

    sources = {ref: preview_source(ref) for ref in config.referenced_models()}
    check_compatible(sources)
    planner = planner_for(config)
    return Preview(sources, planner(config, sources) if planner else None)


def preview_source(ref: str) -> ModelSource:
    """`ref` for a preview: a local folder as it is, a Hub model from its `config.json` alone."""
    if not is_hub_id(ref):
        return ModelSource.open(ref)
    return config_source(ref, fetch(ref, CONFIG_PATTERNS))


def config_source(ref: str, folder: Path) -> ModelSource:
    """`ref` as far as `folder/config.json` tells: every tensor's name, shape and dtype.

    The tensors are those of the transformers model the config describes, built on the meta
    device (no memory, a fraction of a second even for large models): the names and shapes a
    checkpoint of that config holds, so the methods' own planners run on them unchanged. Nothing
    may read their bytes; the merge reads the real headers, which decide where they differ.
    """
    config = read_config(folder, ref)  # bounded: num_hidden_layers <= MAX_LAYERS
    read_index(folder, ref)  # shard names: none may leave the model's folder
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise SourceError(f"{ref}: config.json does not describe a usable model ({e})") from None
    dtype = DTYPE_CODES.get(arch.config_dtype(config) or "float32", "F32")
    no_data = folder / "config.json"  # TensorInfo names a file; these tensors have none
    tensors = {
        name: TensorInfo(name, no_data, dtype, tuple(p.shape), 0, p.numel() * ITEMSIZE[dtype])
        for name, p in model.named_parameters()
    }
    return ModelSource(ref, folder, config, tensors)
