"""Model cards: golden cards per method, Hub metadata, lineage, freshness checks, no leaks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

from hubmerge import zoo
from hubmerge.card import render_card
from hubmerge.card.results import load_results
from hubmerge.config import OlmConfig
from hubmerge.folder import DatasetScores, OlmPosition, OlmReport, OlmSelection, read_report
from hubmerge.methods import olm
from hubmerge.methods.base import Planned
from hubmerge.plan import EdgePlan, LayerPlan, MergePlan
from tests.helpers import cache_repo, run_cli, tensors, write_yaml

GOLDEN = Path(__file__).parent / "golden"
LEADERBOARD = Path(__file__).parent / "data" / "lm_eval_leaderboard.json"
ZOO_RESULTS = Path(__file__).parent / "data" / "lm_eval_zoo.json"
REGEN = os.environ.get("HUBMERGE_REGEN_GOLDEN") == "1"


def assert_golden(text: str, name: str) -> None:
    """Compare with tests/golden/NAME; HUBMERGE_REGEN_GOLDEN=1 rewrites it (review the diff)."""
    path = GOLDEN / name
    if REGEN:
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {name}: run with HUBMERGE_REGEN_GOLDEN=1"
    assert text == path.read_text(), f"{name} changed: HUBMERGE_REGEN_GOLDEN=1 to accept"


@pytest.fixture
def local(models: dict[str, Path]) -> Callable[[str], str]:
    """Link a shared tiny model into the test's folder; returns its relative name."""

    def link(name: str) -> str:
        if not Path(name).exists():
            Path(name).symlink_to(models[name])
        return name

    return link


@pytest.fixture
def hub_cache(offline_hub_cache: Path) -> Callable[[Path, str, str | None], str]:
    """An offline Hub cache: `put(folder, "org/name", readme)` makes the id resolve to a copy."""

    def put(folder: Path, repo_id: str, readme: str | None = None) -> str:
        snapshot = cache_repo(offline_hub_cache, repo_id, folder)
        if readme is not None:
            (snapshot / "README.md").write_text(readme)
        return repo_id

    return put


def merge(config: dict, out: str = "out", *args: str) -> Path:
    result = run_cli("merge", write_yaml(Path(f"{out}.yaml"), config), out, *args)
    assert result.exit_code == 0, result.output
    return Path(out)


def passthrough(*models: str, **extra: object) -> dict:
    """Layers 0-1 of the first model, then 2-3 of the next ones, o_proj halved in the last."""
    slices = [{"sources": [{"model": models[0], "layer_range": [0, 2]}]}]
    for model in models[1:]:
        slices.append({"sources": [{"model": model, "layer_range": [2, 4]}]})
    slices[-1]["sources"][0]["parameters"] = {
        "scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]
    }
    return {"merge_method": "passthrough", "slices": slices, **extra}


def card_of(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def fake_olm(monkeypatch: pytest.MonkeyPatch) -> None:
    """OLM's planner replaced by a recorded search: a hand-made `OlmReport`, the type OLM writes.

    The card reads only the report and the plan, so replaying one keeps the golden card fixed
    (and fast) while using the real merge, staging and card path. `olm_run` below renders
    from a real search instead.
    """

    def planner(config: OlmConfig, sources: object, context: object) -> Planned:
        a, b = config.models
        dataset = next(iter(config.dataset))

        def scores(value: float) -> DatasetScores:
            return {dataset: {"score": value, "tiebreak": 0.0}}

        report = OlmReport(
            version=1,
            fingerprint="f" * 64,
            direction=config.direction,
            aggregate=config.aggregate,
            datasets={dataset: config.dataset[dataset].mode},
            base_model=a,
            base_selection=OlmSelection({a: scores(0.5), b: scores(0.75)}, {a: 1.0, b: 2.0}),
            base_scores=scores(0.5),
            layers=[
                OlmPosition(
                    layer=layer,
                    part=None,
                    candidates=[a, b],
                    current=a,
                    scores={a: scores(0.5), b: scores(0.25 if layer == 2 else 0.625)},
                    metrics={dataset: {a: 0.5, b: 0.25 if layer == 2 else 0.625}},
                    merit={a: 2.0 if layer == 2 else 1.0, b: 1.0 if layer == 2 else 2.0},
                    best_model=b if layer == 2 else a,
                    seconds=0.5,
                )
                for layer in (3, 2, 1, 0)
            ],
            complete=True,
        )
        winners = [a, a, b, a]
        plan = MergePlan(
            method="olm",
            layers=[LayerPlan(m, i) for i, m in enumerate(winners)],
            embed=EdgePlan(a),
            head=EdgePlan(a),
            donor=a,
            tokenizer=a,
            models=[a, b],
        )
        return Planned(plan, (report,))

    monkeypatch.setattr(olm, "METHOD", replace(olm.METHOD, planner=planner))


def test_golden_passthrough_card_and_layer_map(local: Callable[[str], str]) -> None:
    out = merge(passthrough(local("llama"), local("llama_b")))
    assert_golden((out / "README.md").read_text(), "passthrough.md")
    assert_golden((out / "layer_map.svg").read_text(), "passthrough_layer_map.svg")


def test_golden_block_expansion_card(local: Callable[[str], str]) -> None:
    config = {
        "merge_method": "block_expansion",
        "model": local("llama"),
        "interleave": 2,
        "hub": {"repo_id": "acme/llama-pro-tiny", "license": "apache-2.0", "tags": ["tiny"]},
        "card": {"tags": ["llama-pro"]},
    }
    assert_golden((merge(config) / "README.md").read_text(), "block_expansion.md")


def test_golden_olm_card(local: Callable[[str], str], monkeypatch: pytest.MonkeyPatch) -> None:
    fake_olm(monkeypatch)
    Path("add.json").write_text("[]")
    config = {
        "merge_method": "olm",
        "models": [local("llama"), local("llama_b")],
        "dataset": {"add.json": {"mode": "exact"}},
        "card": {"title": "Tiny OLM", "summary": "Layers chosen by OLM on an addition set."},
    }
    assert_golden((merge(config) / "README.md").read_text(), "olm.md")


def test_golden_card_with_results(local: Callable[[str], str]) -> None:
    out = merge(passthrough(local("llama"), local("llama_b")), "out", "--no-card")
    result = run_cli("card", out, "--results", LEADERBOARD, "--results", ZOO_RESULTS)
    assert result.exit_code == 0, result.output
    assert_golden((out / "README.md").read_text(), "evaluated.md")


def test_card_parses_and_metadata_round_trips(local: Callable[[str], str]) -> None:
    out = merge(passthrough(local("llama"), local("llama_b")), "out", "--no-card")
    text = render_card(out, results=[LEADERBOARD, ZOO_RESULTS])
    card = ModelCard(text)
    again = ModelCard(str(card))
    assert again.data.to_dict() == card.data.to_dict()
    assert str(again) == text
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    # `mergekit`: the recipe is a mergekit config (people find merges by the tag on the Hub).
    assert data.tags == ["merge", "mergekit", "hubmerge", "passthrough"]
    assert data.license is None and data.base_model is None  # local donors only, no license
    # model-index parses back into exactly the EvalResults the results files give.
    assert data.model_name == "out"
    expected = load_results([LEADERBOARD, ZOO_RESULTS]).eval_results()
    assert data.eval_results == expected
    labels = [r.dataset_name for r in data.eval_results[:6]]
    assert labels == [
        "IFEval (0-Shot)",
        "BBH (3-Shot)",
        "MATH Lvl 5 (4-Shot)",
        "GPQA (0-shot)",
        "MuSR (0-shot)",
        "MMLU-PRO (5-shot)",
    ]
    assert all(r.source_name and r.source_url for r in data.eval_results)
    assert "| Avg. | 23.61 |" in text and "(self-evaluated)" in text


def test_rendering_is_deterministic(local: Callable[[str], str]) -> None:
    """Same inputs, same bytes: again, from a copy elsewhere, and in a fresh process."""
    out = merge(passthrough(local("llama"), local("llama_b")))
    assert render_card(out).encode() == (out / "README.md").read_bytes()
    shutil.copytree(out, "elsewhere/out")
    with_results = render_card(out, results=[LEADERBOARD, ZOO_RESULTS])
    assert render_card(Path("elsewhere/out"), results=[LEADERBOARD, ZOO_RESULTS]) == with_results
    code = (
        "import sys; from pathlib import Path; from hubmerge.card import render_card; "
        "sys.stdout.write(render_card(Path('out'), results=[Path(sys.argv[1]), Path(sys.argv[2])]))"
    )
    fresh = subprocess.run(
        [sys.executable, "-c", code, str(LEADERBOARD), str(ZOO_RESULTS)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert fresh.stdout == with_results


def test_check_passes_then_fails_after_an_edit(local: Callable[[str], str]) -> None:
    out = merge(passthrough(local("llama"), local("llama_b")))
    result = run_cli("card", out, "--check")
    assert result.exit_code == 0, result.output
    card = out / "README.md"
    card.write_text(card.read_text().replace("## Layer map", "## Layers (edited by hand)"))
    result = run_cli("card", out, "--check")
    assert result.exit_code == 1
    assert "-## Layers (edited by hand)" in result.output and "+## Layer map" in result.output
    assert card.read_text().count("edited by hand") == 1  # --check writes nothing
    assert run_cli("card", out, "--check", "--results", LEADERBOARD).exit_code == 1
    assert run_cli("card", out).exit_code == 0
    assert run_cli("card", out, "--check").exit_code == 0
    assert run_cli("card", "absent", "--check").exit_code == 2


def test_no_card_then_card_command(local: Callable[[str], str]) -> None:
    out = merge(passthrough(local("llama"), local("llama_b")), "out", "--no-card")
    assert not (out / "README.md").exists() and not (out / "layer_map.svg").exists()
    assert (out / "hubmerge_sources.json").exists()
    result = run_cli("card", out, "-o", "cards/card.md")
    assert result.exit_code == 0, result.output
    assert Path("cards/card.md").read_text().startswith("---\nlibrary_name: transformers\n")
    assert Path("cards/layer_map.svg").exists()


@pytest.fixture(scope="module")
def olm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real OLM search on the shipped zoo, once for this module: two models, the addition
    set under an absolute, private-looking path, few samples. Merged without a card; tests
    copy the folder and render from the report the search wrote."""
    root = tmp_path_factory.mktemp("olm")
    data = root / "private" / "add.json"
    data.parent.mkdir()
    shutil.copyfile(zoo.dataset_path("add", "selection"), data)
    config = {
        "merge_method": "olm",
        "models": [str(zoo.model_path("tiny-base")), str(zoo.model_path("tiny-add"))],
        "dataset": {str(data): {"mode": "exact"}},
        "samples": 6,
        "batch_size": 6,
    }
    out = root / "out"
    from hubmerge.methods.olm import search

    saved: list[str] = []
    real_save = search.save_report

    def keep(path: Path, report: OlmReport) -> None:  # the search's own record, as it saves it
        saved.append(json.dumps(report.to_json()))
        real_save(path, report)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(search, "save_report", keep)
        result = run_cli("merge", write_yaml(root / "olm.yaml", config), out, "--no-card")
    assert result.exit_code == 0, result.output
    (root / "search_state.json").write_text(saved[-1])
    return out


def test_the_olm_card_shows_the_search_the_planner_ran(olm_run: Path) -> None:
    """Every decided position of the real report is a table row with its candidates' scores,
    the winner in bold; the base selection lists every starting candidate."""
    report = read_report(olm_run, OlmReport)
    assert report is not None and report.complete and report.layers
    text = render_card(olm_run)
    name = {str(zoo.model_path(m)): m for m in ("tiny-base", "tiny-add")}
    assert report.base_model is not None
    assert f"The base model is **{name[report.base_model]}**" in text
    assert report.base_selection is not None
    for model, scores in report.base_selection.scores.items():
        score = f"{scores[str(next(iter(report.datasets)))]['score']:.4g}"
        label = f"**{name[model]}**" if model == report.base_model else name[model]
        assert f"| {label} | {score} |" in text, (label, score)
    for position in report.layers:
        for model in position.candidates:
            score = next(iter(position.scores[model].values()))["score"]
            label = f"**{name[model]}**" if model == position.best_model else name[model]
            assert f"| {position.layer} | {label} | {score:.4g} |" in text, (position, model)
    # The typed report holds all the search recorded, and reads back as it was written: one
    # layout for the search, the merge's writer and the card.
    written = json.loads((olm_run / "merge_report.json").read_text())
    assert written == json.loads((olm_run.parent / "search_state.json").read_text())
    assert report.to_json() == written


def test_nothing_machine_specific_in_a_card(olm_run: Path, tmp_path: Path) -> None:
    """Absolute model and dataset paths (as users often write them) never reach the card."""
    out = tmp_path / "out"
    shutil.copytree(olm_run, out)
    results = json.loads(ZOO_RESULTS.read_text())
    results["config"]["model"] = str(out)
    Path("results.json").write_text(json.dumps(results))
    assert run_cli("card", out, "--results", "results.json").exit_code == 0
    written = (out / "README.md").read_text() + (out / "layer_map.svg").read_text()
    models = str(zoo.model_path("tiny-base").parent)
    config_text = (out / "hubmerge_config.yml").read_text()
    assert str(olm_run.parent) in config_text and models in config_text  # the inputs hold them
    for secret in {str(tmp_path), str(olm_run.parent), models, str(Path.home())}:
        assert secret not in written
    assert not re.search(r"(^|[\s`'\"(])/(tmp|home|root|Users)/", written, re.MULTILINE)
    assert "`add.json` (exact)" in written and "| **tiny-" in written


def test_base_model_lists_only_hub_donors_and_license_is_inherited(
    local: Callable[[str], str], models: dict[str, Path], hub_cache: Callable
) -> None:
    apache = "---\nlicense: apache-2.0\nlanguage: [en]\n---\n# A model\n"
    hub_a = hub_cache(models["llama"], "acme/tiny-a", apache)
    hub_b = hub_cache(models["llama_b"], "acme/tiny-b", apache)
    shutil.copytree(models["llama_b"], "mine")
    Path("mine/README.md").write_text(apache)

    data = card_of(merge(passthrough(hub_a, "mine", hub_b), "all_apache")).data
    assert data.base_model == ["acme/tiny-a", "acme/tiny-b"]  # base first, pool order, no local
    assert data.base_model_relation == "merge"
    assert data.license == "apache-2.0" and data.language == ["en"]

    # No common license: no `license` at all (never `other` without its name and link), and the
    # card says so in words.
    Path("mine/README.md").write_text("---\nlicense: mit\n---\n")
    mixed = card_of(merge(passthrough(hub_a, "mine"), "mixed"))
    assert "license" not in mixed.data.to_dict() and "license:" not in mixed.content
    assert "The license of this model is unknown" in mixed.text
    unknown = card_of(merge(passthrough(hub_a, local("llama")), "unknown"))
    assert unknown.data.license is None and "license of this model is unknown" in unknown.text
    Path("mine/README.md").write_text("---\nlicense: other\nlicense_name: custom\n---\n")
    other = card_of(merge(passthrough("mine"), "custom"))
    assert other.data.license is None and "license of this model is unknown" in other.text
    config = passthrough(hub_a, "mine", hub={"license": "cc-by-4.0", "language": "fr"})
    data = card_of(merge(config, "configured")).data
    assert data.license == "cc-by-4.0" and data.language == "fr"
    text = (Path("configured") / "README.md").read_text()
    assert "[acme/tiny-a](https://huggingface.co/acme/tiny-a)" in text
    assert "[`0123456`](https://huggingface.co/acme/tiny-a/tree/0123456789abcdef" in text


def test_lineage_of_a_merge_of_merges(
    local: Callable[[str], str], models: dict[str, Path], hub_cache: Callable
) -> None:
    hub_a = hub_cache(models["llama"], "acme/tiny-a", "---\nlicense: apache-2.0\n---\n")
    first = merge(passthrough(hub_a, local("llama_b")), "first")
    assert card_of(first).data.base_model == ["acme/tiny-a"]

    second = merge(passthrough(str(first), local("llama")), "second")
    data = card_of(second).data
    assert data.base_model is None  # both donors are local folders
    text = (second / "README.md").read_text()
    lineage = text.split("### Lineage")[1].split("##")[0]
    assert "`first` ← [acme/tiny-a](https://huggingface.co/acme/tiny-a)" in lineage


def test_custom_templates_and_their_errors(local: Callable[[str], str]) -> None:
    out = merge(passthrough(local("llama"), local("llama_b")))
    Path("t.md").write_text("---\n{{ card_data }}\n---\n# {{ title }} from {{ donors | length }}\n")
    result = run_cli("card", out, "--template", "t.md")
    assert result.exit_code == 0, result.output
    assert (out / "README.md").read_text().endswith("---\n# out from 2\n")

    Path("bad.md").write_text("---\n{{ card_data }}\n---\n\n{% for x in donors %}\n{{ x }\n")
    result = run_cli("card", out, "--template", "bad.md")
    assert result.exit_code == 2
    assert result.output.startswith("error: bad.md:6: template syntax error")
    assert len(result.output.strip().splitlines()) == 1

    Path("nodata.md").write_text("# {{ title }}\n")
    result = run_cli("card", out, "--template", "nodata.md")
    assert result.exit_code == 2 and "must start with ---, {{ card_data }}, ---" in result.output

    config = passthrough(local("llama"), local("llama_b"), card={"template": "t.md"})
    assert (merge(config, "templated") / "README.md").read_text().endswith("# templated from 2\n")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"acc": 0.5}', "not an lm-eval results file (expected a 'results' mapping"),
        ("not json", "not an lm-eval results file (invalid JSON"),
        ('{"results": {"arc": 0.5}}', "not an lm-eval results file"),
    ],
)
def test_bad_results_file(local: Callable[[str], str], content: str, message: str) -> None:
    out = merge(passthrough(local("llama"), local("llama_b")))
    Path("r.json").write_text(content)
    result = run_cli("card", out, "--results", "r.json")
    assert result.exit_code == 2
    assert result.output.startswith(f"error: r.json: {message}")
    assert len(result.output.strip().splitlines()) == 1


def test_a_task_in_two_results_files(local: Callable[[str], str]) -> None:
    out = merge(passthrough(local("llama"), local("llama_b")))
    shutil.copy(ZOO_RESULTS, "again.json")
    result = run_cli("card", out, "--results", ZOO_RESULTS, "--results", "again.json")
    assert result.exit_code == 2 and "is also in" in result.output


def test_usage_snippet_runs(tmp_path: Path) -> None:
    """The card's transformers snippet, pointed at the folder, loads and chats."""
    shutil.copytree(zoo.model_path("tiny-base"), "chat")  # a real chat model: template included
    out = merge({"merge_method": "block_expansion", "model": "chat", "append": 1})
    text = (out / "README.md").read_text()
    code = text.split("```python\n")[1].split("```")[0]
    assert "apply_chat_template" in code
    result = subprocess.run(
        [sys.executable, "-c", code.replace('model_id = "out"', f'model_id = "{out.absolute()}"')],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_card_path_imports_neither_torch_nor_transformers(local: Callable[[str], str]) -> None:
    out = merge(passthrough(local("llama"), local("llama_b")), "out", "--no-card")
    code = (
        "import sys\nfrom pathlib import Path\nimport hubmerge.merge\n"
        "from hubmerge.card import write_card\nwrite_card(Path('out'))\n"
        "heavy = [m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (out / "README.md").exists()
    # `hubmerge card` (and CI's `card --all --check`) do not even load the merge engine.
    for args in (["card", "out"], ["card", "--all", ".", "--check"]):
        code = (
            f"import sys\nsys.argv = ['hubmerge', *{args!r}]\nfrom hubmerge.cli import app\n"
            "try:\n    app()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "heavy = ('torch', 'transformers', 'hubmerge.merge', 'hubmerge.writer')\n"
            "loaded = [m for m in heavy if m in sys.modules]\nassert not loaded, loaded\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_recipe_in_the_card_rebuilds_the_model(local: Callable[[str], str]) -> None:
    """The YAML a reader copies from the card, merged again, gives the same tensors."""
    out = merge(passthrough(local("llama"), local("llama_b")))
    recipe = yaml.safe_load((out / "README.md").read_text().split("```yaml\n")[1].split("```")[0])
    rebuilt = merge(recipe, "rebuilt")
    original, again = tensors(out), tensors(rebuilt)
    assert sorted(original) == sorted(again)
    for name, tensor in original.items():
        assert torch.equal(tensor, again[name]), name
    # The scaled slice really is scaled: the rebuild did not just copy one donor.
    assert not torch.equal(
        again["model.layers.2.self_attn.o_proj.weight"],
        tensors(Path(local("llama_b")))["model.layers.2.self_attn.o_proj.weight"],
    )


def test_golden_ner_card(
    local: Callable[[str], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HUBMERGE_CACHE", str(tmp_path / "cache"))
    config = {
        "merge_method": "ner",
        "base_model": local("llama"),
        "models": [local("llama"), local("llama_b")],
        "hub": {"repo_id": "acme/ner-tiny"},
    }
    out = merge(config)
    text = (out / "README.md").read_text()
    assert "![NER per layer and model](ner_heatmap.png)" in text
    assert_golden(text, "ner.md")


def test_ner_scores_show_enough_digits_to_tell_the_winner(
    local: Callable[[str], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NER margins can be 1e-7: the bold winner must not print the same number as the loser."""
    monkeypatch.setenv("HUBMERGE_CACHE", str(tmp_path / "cache"))
    config = {
        "merge_method": "ner",
        "base_model": local("llama"),
        "models": [local("llama"), local("llama_b")],
    }
    out = merge(config)
    report_path = out / "ner_report.json"
    report = json.loads(report_path.read_text())
    for i, record in enumerate(report["layers"]):
        winner, loser = (record["chosen"], *(m for m in report["models"] if m != record["chosen"]))
        record["scores"][winner]["mean"] = 0.5123456 + 1e-7 + i * 0.1
        record["scores"][loser]["mean"] = 0.5123456 + i * 0.1
    report_path.write_text(json.dumps(report))
    rows = [line for line in render_card(out).splitlines() if re.match(r"\| \d+ \| [*\d]", line)]
    assert len(rows) == len(report["layers"])
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        bold = [c.strip("*") for c in cells if c.startswith("**")]
        plain = [c for c in cells if not c.startswith("**")]
        assert len(bold) == 1 and len(plain) == 1
        assert float(bold[0]) > float(plain[0])  # readably different, the winner higher


def test_the_layer_map_is_as_wide_as_its_longest_label(local: Callable[[str], str]) -> None:
    """Long scale labels and module lists are not cut off at a fixed width."""
    name = "a-model-with-a-rather-long-folder-name-" + "x" * 40
    shutil.copytree(Path(local("llama")).resolve(), name)
    scales = [{"filter": f, "value": 0.5} for f in ("q_proj", "k_proj", "v_proj", "o_proj")]
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": name, "layer_range": [0, 4], "parameters": {"scale": scales}}]}
        ],
    }
    svg = (merge(config) / "layer_map.svg").read_text()
    width = int(re.search(r"<svg [^>]*width='(\d+)'", svg).group(1))
    detail = next(
        t for t in re.findall(r"<text x='(\d+)'[^>]*>([^<]*)</text>", svg) if "x0.5" in t[1]
    )
    # 11 px monospace: 0.6 em, 6.6 px a character.
    assert int(detail[0]) + 6.6 * len(detail[1]) <= width
    assert width > 520
