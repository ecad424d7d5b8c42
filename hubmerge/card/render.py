"""Render a merged model's card: Hub metadata as `ModelCardData`, the body from a Jinja2 template.

The template receives `card_data` (the YAML block, which it must place first, between `---`
lines) and the context `card_context` documents. Rendering is deterministic: it reads only the
model folder, the results files and the template, and iterates nothing unordered.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import ModelCard, ModelCardData

from hubmerge import arch, methods
from hubmerge.card.facts import ModelFacts, read_facts
from hubmerge.card.layermap import layer_map_svg
from hubmerge.card.results import Evaluation, load_results
from hubmerge.config import HubSettings
from hubmerge.errors import CardError
from hubmerge.folder import CARD_FILE, LAYER_MAP_FILE, Donor, yaml_text
from hubmerge.methods.base import CardInputs

DEFAULT_TEMPLATE = "model_card.md"
#: Lines of diff `hubmerge card --check` shows; the rest is counted, not printed.
DIFF_LINES = 40


@dataclass(frozen=True)
class Rendered:
    card: str
    layer_map: str


def render_card(
    model_dir: Path,
    *,
    results: Sequence[Path] = (),
    template: Path | None = None,
    name: str | None = None,
    repo_id: str | None = None,
) -> str:
    """The card (README.md text) of the merged model in `model_dir`.

    `results` are lm-eval results files; `template` replaces the default (and the config's
    `card.template`). `name` is the model's folder name when `model_dir` is a staging folder.
    `repo_id` is the Hub repo the card is for (default: the config's `hub.repo_id`): its title
    and usage snippet name that repo, so the snippet loads the model from where it is published.
    """
    return _render(model_dir, results, template, name, repo_id).card


def write_card(
    model_dir: Path,
    *,
    results: Sequence[Path] = (),
    template: Path | None = None,
    output: Path | None = None,
    name: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Write the card to `output` (default `model_dir/README.md`) and `layer_map.svg` beside it.

    The methods' images (NER's heatmap) are drawn into `model_dir` from its reports first.
    """
    draw_images(model_dir)
    rendered = _render(model_dir, results, template, name, repo_id)
    output = Path(output) if output else Path(model_dir) / CARD_FILE
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(rendered.card, encoding="utf-8")
    (output.parent / LAYER_MAP_FILE).write_text(rendered.layer_map, encoding="utf-8")
    return output


def draw_images(model_dir: Path) -> None:
    """Draw the card's pictures that the methods make from their reports (NER's heatmap)."""
    for method in methods.every():
        if method.images is not None:
            method.images(Path(model_dir))


def check_card(
    model_dir: Path,
    *,
    results: Sequence[Path] = (),
    template: Path | None = None,
    output: Path | None = None,
    repo_id: str | None = None,
) -> str | None:
    """None when the card on disk is what rendering gives now; else a short unified diff."""
    path = Path(output) if output else Path(model_dir) / CARD_FILE
    fresh = render_card(model_dir, results=results, template=template, repo_id=repo_id)
    return stale_diff(path, fresh)


def card_files(
    model_dir: Path,
    *,
    results: Sequence[Path] = (),
    template: Path | None = None,
    repo_id: str | None = None,
) -> dict[str, str]:
    """What `write_card` writes into `model_dir`, by file name: the card and its layer map."""
    rendered = _render(model_dir, results, template, None, repo_id)
    return {CARD_FILE: rendered.card, LAYER_MAP_FILE: rendered.layer_map}


def stale_diff(path: Path, fresh: str) -> str | None:
    """A unified diff from the file at `path` to `fresh`; None when they are the same.

    A missing file counts as empty. The diff is cut to `DIFF_LINES`, so a CI log stays readable.
    """
    try:
        on_disk = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        on_disk = ""
    if on_disk == fresh:
        return None
    diff = list(
        difflib.unified_diff(
            on_disk.splitlines(),
            fresh.splitlines(),
            f"{path.name} (on disk)",
            f"{path.name} (fresh render)",
            lineterm="",
        )
    )
    if len(diff) > DIFF_LINES:
        diff = diff[:DIFF_LINES] + [f"... ({len(diff) - DIFF_LINES} more diff lines)"]
    return "\n".join(diff)


def _render(
    model_dir: Path,
    results: Sequence[Path],
    template: Path | None,
    name: str | None,
    repo_id: str | None = None,
) -> Rendered:
    facts = read_facts(Path(model_dir), name)
    if repo_id:
        facts = _for_repo(facts, repo_id)
    evaluation = load_results(results) if results else None
    data = card_data(facts, evaluation)
    context = card_context(facts, evaluation)
    source, label = _template(template, facts)
    try:
        card = ModelCard.from_template(data, template_str=source, **context)
    except jinja2.TemplateSyntaxError as e:
        raise CardError(f"{label}:{e.lineno}: template syntax error: {e.message}") from None
    except jinja2.TemplateError as e:
        raise CardError(f"{label}: template error: {e}") from None
    except ValueError as e:  # the rendered front matter is not valid YAML
        raise CardError(f"{label}: renders an invalid card ({e})") from None
    if card.data.to_dict() != data.to_dict():
        raise CardError(f"{label}: a card template must start with ---, {{{{ card_data }}}}, ---")
    # Sections a template leaves out leave blank lines behind: one is as good as many in
    # Markdown, and templates stay readable without Jinja's whitespace control on every tag.
    text = re.sub(r"\n{3,}", "\n\n", str(card)).rstrip("\n") + "\n"
    donors = list(dict.fromkeys(facts.names.model(ref) for ref in facts.plan.models))
    return Rendered(text, layer_map_svg(_layer_rows(facts), donors))


def card_data(facts: ModelFacts, evaluation: Evaluation | None) -> ModelCardData:
    """The Hub metadata: base models, license, tags and evaluation results."""
    hub, card = _settings(facts)
    donors = _donors(facts)
    base_model = list(dict.fromkeys(d.name for d in donors if d.hub))
    results = evaluation.eval_results() if evaluation else []
    return ModelCardData(
        base_model=base_model or None,
        language=(hub.language if hub and hub.language else None) or _common(donors, "language"),
        library_name="transformers",
        license=_license(facts),
        pipeline_tag="text-generation",
        tags=[
            "merge",
            # mergekit's own cards carry it, and people find merges by it on the Hub.
            *(["mergekit"] if facts.recipe.get("merge_method") else []),
            "hubmerge",
            facts.plan.method,
            *(hub.tags if hub else []),
            *(card.tags if card else []),
        ],
        base_model_relation="merge" if base_model else None,
        eval_results=results or None,
        model_name=_model_id(facts) if results else None,
    )


def card_context(facts: ModelFacts, evaluation: Evaluation | None) -> dict[str, Any]:
    """What the template sees besides `card_data` (and the metadata fields themselves).

    `title`, `summary` (None: the template writes one), `repo_id`, `model_id` (for code),
    `license` (None when unknown), `method`, `architecture`, `dtype`, `num_layers`, `donors`
    (name, url, revision, roles, layers, license, hub), `lineage` (name, parents),
    `local_donors`, `layers` (rows of output, model, layer, scales), `layer_map` (image file),
    `settings` (the method's config), `recipe` and `config_yaml` (YAML text), `olm`, `ner`,
    `mergekit` (for methods mergekit computed: the method's `name`, paper `url`, mergekit
    `version`, `random_seed` and parameter `tables`, each with `title`, `columns` and `rows`),
    `evaluation` and `chat_template`.
    """
    hub, card = _settings(facts)
    names = facts.names
    plan = facts.plan
    distinct = _donors(facts)
    # A layer counts for every model it reads a tensor of: a blended layer for each term's.
    taken = Counter(model for layer in plan.layers for model in layer.contributors())
    donors = []
    for ref in plan.models:
        donor = facts.donors[ref]
        roles = [
            role
            for role, owner in (
                ("config", plan.donor),
                ("tokenizer", plan.tokenizer),
                ("embeddings", plan.embed.model),
                ("head", plan.head.model),
            )
            if owner == ref
        ]
        donors.append(
            {
                "name": donor.name,
                "hub": donor.hub,
                "url": donor.url,
                "revision": donor.revision,
                "roles": roles,
                "layers": taken[ref],
                "license": donor.license,
            }
        )
    settings = {
        k: v for k, v in facts.config_data.items() if k not in ("merge_method", "hub", "card")
    }
    model_config = facts.model_config
    return {
        "title": (card.title if card else None) or _model_id(facts).split("/")[-1],
        "summary": card.summary if card else None,
        "repo_id": hub.repo_id if hub else None,
        "model_id": _model_id(facts),
        "license": _license(facts),
        "method": plan.method,
        "architecture": (model_config.get("architectures") or ["?"])[0],
        "dtype": arch.config_dtype(model_config),
        "num_layers": len(plan.layers),
        "donors": donors,
        "lineage": [
            {"name": d.name, "url": d.url, "parents": list(d.base_model)}
            for d in distinct
            if d.base_model
        ],
        "local_donors": any(not d["hub"] for d in donors),
        "layers": _layer_rows(facts),
        "layer_map": LAYER_MAP_FILE,
        "settings": names.public(settings),
        "recipe": yaml_text(names.public(facts.recipe)) if facts.recipe else None,
        "recipe_method": facts.recipe.get("merge_method", "passthrough"),
        "config_yaml": yaml_text(names.public(facts.config_data)) if facts.config_data else None,
        **_method_sections(facts),
        "evaluation": evaluation,
        "chat_template": facts.chat_template,
    }


def _method_sections(facts: ModelFacts) -> dict[str, Any]:
    """Every method's card section (`olm`, `ner`, `mergekit`): None unless its report is there."""
    inputs = CardInputs(facts.folder, facts.names, facts.config_data)
    return {
        method.card_key: method.card(inputs)
        for method in methods.every()
        if method.card_key is not None and method.card is not None
    }


def _settings(facts: ModelFacts) -> tuple[Any, Any]:
    """The config's `hub:` and `card:` sections (None when absent, or without a config)."""
    config = facts.config
    return (config.hub, config.card) if config else (None, None)


def _for_repo(facts: ModelFacts, repo_id: str) -> ModelFacts:
    """`facts` as if the config's `hub.repo_id` were `repo_id`: the card of the published model."""
    if facts.config is None:  # no config to carry it: the name is what `_model_id` falls back to
        return replace(facts, name=repo_id)
    hub = (facts.config.hub or HubSettings()).model_copy(update={"repo_id": repo_id})
    return replace(facts, config=facts.config.model_copy(update={"hub": hub}))


def _model_id(facts: ModelFacts) -> str:
    """How readers load the model: its Hub repo when configured, else the folder's name."""
    hub, _ = _settings(facts)
    return hub.repo_id if hub and hub.repo_id else facts.name


def _donors(facts: ModelFacts) -> list[Donor]:
    """The plan's models (base first), each once."""
    missing = [ref for ref in facts.plan.models if ref not in facts.donors]
    if missing:
        raise CardError(
            f"{facts.folder.name}: {facts.names.model(missing[0])} is in the plan but not in "
            "hubmerge_sources.json (files from different merges?)"
        )
    return list(dict.fromkeys(facts.donors[ref] for ref in facts.plan.models))


def _license(facts: ModelFacts) -> str | None:
    """The license the metadata names: `hub.license`, else the one every donor's card names.

    None when neither is known, and then the card says so. `other` is not named either: the Hub
    wants a `license_name` and `license_link` beside it, which hubmerge does not know.
    """
    hub, _ = _settings(facts)
    license = (hub.license if hub else None) or _common(_donors(facts), "license")
    return license if license != "other" else None


def _common(donors: Sequence[Donor], field: str) -> Any:
    """A metadata value every donor's card gives, identically; None if any lacks or differs."""
    values = {getattr(d, field) for d in donors}
    value = values.pop() if len(values) == 1 else None
    return (list(value) if isinstance(value, tuple) else value) or None


def _layer_rows(facts: ModelFacts) -> list[tuple[str, str, str, str]]:
    return facts.plan.renamed(facts.names.model).rows()


def _template(path: Path | None, facts: ModelFacts) -> tuple[str, str]:
    """The template's text and the name errors use: `--template`, `card.template`, the default."""
    _, card = _settings(facts)
    chosen = path or (Path(card.template) if card and card.template else None)
    if chosen is None:
        return (files("hubmerge.card_templates") / DEFAULT_TEMPLATE).read_text("utf-8"), (
            DEFAULT_TEMPLATE
        )
    try:
        return chosen.read_text(encoding="utf-8"), chosen.name
    except OSError as e:
        raise CardError(f"{chosen}: cannot read card template ({e.strerror})") from None
