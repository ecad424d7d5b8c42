"""mergekit's own methods (slerp, ties, task_arithmetic, weighted linear) run through mergekit.

`hubmerge merge` must give exactly the tensors mergekit gives on the same file, computed here by
mergekit independently (its API in-process, and `mergekit-yaml` in a subprocess once), read back
with the official safetensors library; and the card, recipe, sources and publishing that follow
a merge must work on each. The models are tiny fine-tunes of one base, as these methods expect.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from hubmerge.config import LinearConfig, MergekitConfig, parse_config
from tests.helpers import (
    CACHED_SHA,
    assert_same_tensors,
    cache_repo,
    run_cli,
    tensors,
    write_yaml,
)
from tests.hubserver import HubServer, published_files
from tests.tinymodels import make_model

pytest.importorskip("mergekit", reason="mergekit is not installed (extra `mergekit`)")


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Qwen2 base (with `layer_types`) and three "fine-tunes": the base plus small noise."""
    root = tmp_path_factory.mktemp("family")
    base = make_model("qwen2", root / "base", seed=0)
    models = {"base": base}
    weights = load_file(base / "model.safetensors")
    for seed, name in enumerate(("ft_a", "ft_b", "ft_c"), start=1):
        folder = root / name
        shutil.copytree(base, folder)
        generator = torch.Generator().manual_seed(seed)
        tuned = {
            k: v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in weights.items()
        }
        save_file(tuned, folder / "model.safetensors", metadata={"format": "pt"})
        models[name] = folder
    return models


def slerp(m: dict[str, Path]) -> dict[str, Any]:
    """mergekit's README example: gradient `t` per module filter, 0.5 elsewhere."""
    return {
        "merge_method": "slerp",
        "base_model": str(m["base"]),
        "slices": [
            {
                "sources": [
                    {"model": str(m["base"]), "layer_range": [0, 4]},
                    {"model": str(m["ft_a"]), "layer_range": [0, 4]},
                ]
            }
        ],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        "dtype": "float32",
    }


def ties(m: dict[str, Path]) -> dict[str, Any]:
    return {
        "merge_method": "ties",
        "base_model": str(m["base"]),
        "models": [
            {"model": str(m["ft_a"]), "parameters": {"density": 0.5, "weight": 0.7}},
            {"model": str(m["ft_b"]), "parameters": {"density": [1, 0.4], "weight": 0.3}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }


def task_arithmetic(m: dict[str, Path]) -> dict[str, Any]:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(m["base"]),
        "models": [
            {"model": str(m["ft_a"]), "parameters": {"weight": 0.6}},
            {"model": str(m["ft_b"]), "parameters": {"weight": 0.4}},
            {"model": str(m["ft_c"]), "parameters": {"weight": -0.2}},
        ],
    }


def weighted_linear(m: dict[str, Path]) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "models": [
            {"model": str(m["ft_a"]), "parameters": {"weight": 0.5}},
            {"model": str(m["ft_b"]), "parameters": {"weight": 0.3}},
            {"model": str(m["ft_c"]), "parameters": {"weight": 0.2}},
        ],
        "dtype": "float32",
    }


CASES = {
    "slerp": slerp,
    "ties": ties,
    "task_arithmetic": task_arithmetic,
    "linear": weighted_linear,
}


def hubmerge(config: dict[str, Any], out: str, *args: str) -> Path:
    result = run_cli("merge", write_yaml(Path(f"{out}.yaml"), config), out, *args)
    assert result.exit_code == 0, result.output
    return Path(out).absolute()


def mergekit_api(config: dict[str, Any], out: Path) -> Path:
    """mergekit on its own, through its Python API, with its default options."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out), MergeOptions(quiet=True))
    return out


@pytest.mark.parametrize("method", list(CASES))
def test_hubmerge_gives_mergekits_tensors_and_a_card(
    method: str, family: dict[str, Path], tmp_path: Path
) -> None:
    config = CASES[method](family)
    assert isinstance(parse_config(config, "c"), MergekitConfig)
    out = hubmerge(config, "out")
    reference = mergekit_api(config, tmp_path / "reference")
    assert_same_tensors(out, reference)
    # The merge is not a copy of any input: the method did compute something.
    base = tensors(family["base"])["model.layers.1.mlp.up_proj.weight"]
    assert not torch.equal(tensors(out)["model.layers.1.mlp.up_proj.weight"], base)

    recipe = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert recipe == config  # local models: the config as given, pinned to nothing
    assert (out / "hubmerge_sources.json").is_file()
    assert yaml.safe_load((out / "hubmerge_config.yml").read_text())["merge_method"] == method
    report = json.loads((out / "hubmerge_mergekit.json").read_text())
    assert report["method"] == method

    card = (out / "README.md").read_text()
    assert "## Layer map" not in card  # tensors are blends, not layers taken from one model
    assert f"**{report['name']}**" in card
    if report["reference_url"] and "arxiv.org/abs/" in report["reference_url"]:
        assert f"(https://arxiv.org/abs/{report['reference_url'].split('/abs/')[1]})" in card
    assert ModelCard(card).data.tags and method in ModelCard(card).data.tags
    # `hubmerge card --check` re-renders the same card from the folder alone.
    assert run_cli("card", out, "--check").exit_code == 0


def test_parameters_are_tables_per_model_and_slice(family: dict[str, Path]) -> None:
    card = (hubmerge(ties(family), "out") / "README.md").read_text()
    assert "| Model | density | weight |" in card
    assert "| ft_a | 0.5 | 0.7 |" in card
    assert "| ft_b | [1, 0.4] | 0.3 |" in card
    assert "| base (base) | - | - |" in card
    assert "| normalize | True |" in card

    card = (hubmerge(slerp(family), "slerp") / "README.md").read_text()
    assert "| t | self_attn: [0, 0.5, 0.3, 0.7, 1]; mlp: [1, 0.5, 0.7, 0.3, 0]; *: 0.5 |" in card
    assert "| base (base) | 0-3 |" in card


def test_mergekit_yaml_rebuilds_the_recipe(family: dict[str, Path], tmp_path: Path) -> None:
    """mergekit's own command, on the recipe hubmerge wrote, gives the same tensors."""
    out = hubmerge(slerp(family), "out")
    cli = Path(sys.executable).parent / "mergekit-yaml"
    command = [str(cli) if cli.exists() else "mergekit-yaml"]
    done = subprocess.run(
        [*command, str(out / "mergekit_config.yml"), str(tmp_path / "cli")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_tensors(out, tmp_path / "cli")


def test_depth_changing_slerp_gets_a_config_transformers_5_loads(
    family: dict[str, Path], tmp_path: Path
) -> None:
    """mergekit alone fails on `layer_types` here; hubmerge gives it the rewritten config."""
    pair = [{"model": str(family[m]), "layer_range": [0, 4]} for m in ("base", "ft_a")]
    tail = [{"model": str(family[m]), "layer_range": [2, 4]} for m in ("base", "ft_a")]
    config = slerp(family) | {"slices": [{"sources": pair}, {"sources": tail}]}
    out = hubmerge(config, "out")
    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 6 and len(written["layer_types"]) == 6
    assert AutoConfig.from_pretrained(out).num_hidden_layers == 6
    with pytest.raises(Exception):  # noqa: B017 - mergekit's failure is what this guards against
        mergekit_api(config, tmp_path / "plain")
    # The first slice is the 4-layer slerp, which mergekit computes on its own; output layer 4
    # is the second slice's first: input layer 2, where the attention gradient starts at t = 0.
    weights, four = tensors(out), tensors(mergekit_api(slerp(family), tmp_path / "four"))
    for name, tensor in four.items():
        if name.startswith("model.layers."):
            assert torch.equal(weights[name], tensor), name
    assert torch.allclose(
        weights["model.layers.4.self_attn.q_proj.weight"],
        tensors(family["base"])["model.layers.2.self_attn.q_proj.weight"],
        atol=1e-6,
    )


def test_hub_ids_are_pinned_in_the_recipe_and_the_card(
    family: dict[str, Path], offline_hub_cache: Path
) -> None:
    for name in ("base", "ft_a"):
        cache_repo(offline_hub_cache, f"acme/{name}", family[name])
    config = json.loads(
        json.dumps(slerp(family))
        .replace(json.dumps(str(family["base"])), '"acme/base"')
        .replace(json.dumps(str(family["ft_a"])), '"acme/ft_a"')
    )
    out = hubmerge(config, "out")
    assert_same_tensors(out, hubmerge(slerp(family), "local"))
    recipe = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert recipe["base_model"] == f"acme/base@{CACHED_SHA}"
    assert [s["model"] for s in recipe["slices"][0]["sources"]] == [
        f"acme/base@{CACHED_SHA}",
        f"acme/ft_a@{CACHED_SHA}",
    ]
    data = ModelCard((out / "README.md").read_text()).data
    assert data.base_model == ["acme/base", "acme/ft_a"]
    assert data.base_model_relation == "merge"


def test_publish_uploads_a_mergekit_merge(family: dict[str, Path], hub: HubServer) -> None:
    out = hubmerge(task_arithmetic(family), "out")
    result = run_cli("publish", out, "--repo-id", "org/task-arithmetic")
    assert result.exit_code == 0, result.output
    stored = hub.repos["org/task-arithmetic"].files
    expected = published_files(out)
    # The card is rendered for the repository it goes to; every other file goes as it is.
    assert {k: v for k, v in stored.items() if k != "README.md"} == {
        k: v for k, v in expected.items() if k != "README.md"
    }
    assert "hubmerge_mergekit.json" in stored
    card = stored["README.md"].decode()
    assert 'model_id = "org/task-arithmetic"' in card and "**Task Arithmetic**" in card


def test_selection_linear_stays_hubmerges_and_weighted_goes_to_mergekit() -> None:
    selection = {
        "merge_method": "linear",
        "slices": [
            {
                "sources": [
                    {"model": "a", "layer_range": [0, 2], "parameters": {"weight": 1}},
                    {"model": "b", "layer_range": [0, 2], "parameters": {"weight": 0}},
                ]
            }
        ],
    }
    assert isinstance(parse_config(selection, "c"), LinearConfig)
    blend = json.loads(json.dumps(selection).replace('"weight": 1', '"weight": [1, 0]'))
    assert isinstance(parse_config(blend, "c"), MergekitConfig)
    blend = json.loads(json.dumps(selection).replace('"weight": 1', '"weight": 0.5'))
    assert isinstance(parse_config(blend, "c"), MergekitConfig)


def refused(tmp_path: Path, config: dict[str, Any], needle: str) -> None:
    result = run_cli("merge", write_yaml(tmp_path / "c.yaml", config), tmp_path / "out")
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and message.startswith("error:"), message
    assert needle in message, message
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*")), "a staging folder was left behind"


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (
            lambda c: c["models"][0]["parameters"].update(dnsity=0.5),
            "c.yaml: models[0].parameters.dnsity: unknown parameter of ties (did you mean density?",
        ),
        (lambda c: c["models"][1].update(wieght=1), "c.yaml: models[1].wieght: unknown key"),
        (lambda c: c.update(merge_method="tiess"), "merge_method: unknown method 'tiess'"),
        (
            lambda c: c.update(slices=[{"sources": [{"model": "m", "layer_range": [0, 4]}]}]),
            "Exactly one of 'models', 'slices', or 'modules' must be present",
        ),
        (lambda c: c.update(base_model=3), "c.yaml: base_model"),
    ],
)
def test_bad_mergekit_configs_are_one_line(
    family: dict[str, Path], tmp_path: Path, edit: Any, needle: str
) -> None:
    config = ties(family)
    edit(config)
    refused(tmp_path, config, needle)


def test_a_required_parameter_is_named(family: dict[str, Path], tmp_path: Path) -> None:
    config = slerp(family)
    del config["parameters"]
    refused(tmp_path, config, "c.yaml: parameters.t: required by slerp")


def test_without_mergekit_the_error_names_the_extra(
    family: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As if mergekit were not installed: its import fails.
    monkeypatch.setitem(sys.modules, "mergekit.merge_methods", None)
    refused(tmp_path, slerp(family), "pip install 'hubmerge[mergekit]'")
    # A selection `linear` and passthrough need no mergekit.
    passthrough = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(family["base"]), "layer_range": [0, 2]}]}],
    }
    assert run_cli("merge", write_yaml(tmp_path / "p.yaml", passthrough), "p").exit_code == 0


def test_the_space_form_writes_mergekit_configs_and_validate_shows_parameters(
    family: dict[str, Path],
) -> None:
    from hubmerge import space
    from hubmerge.space import form, handlers

    values = form.FORM_DEFAULTS | {
        "method": "slerp",
        "mk_base": str(family["base"]),
        "mk_models": [[str(family["ft_a"]), "", ""]],
        "mk_t": "self_attn=[0, 1], mlp=[1, 0], 0.5",
    }
    data = form.form_config(values)
    assert data == {
        "merge_method": "slerp",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["ft_a"])}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 1]},
                {"filter": "mlp", "value": [1, 0]},
                {"value": 0.5},
            ]
        },
    }
    config = space.read_config_text(yaml.safe_dump(data))
    assert form.form_config(form.FORM_DEFAULTS | form.config_form(config)) == data

    checked = space.check(yaml.safe_dump(ties(family)))
    assert checked.rows is None and checked.depth == 4 and checked.parameters
    status, rows = handlers.validate(yaml.safe_dump(ties(family)))
    assert "computed by mergekit" in status and rows == []
    assert "ft\\_a | 0.5 | 0.7 |" in status  # the table, Markdown-escaped

    typo = yaml.safe_dump(ties(family)).replace("density: 0.5", "dnsity: 0.5")
    status, _ = handlers.validate(typo)
    assert "unknown parameter of ties" in status


def test_a_shared_space_reads_no_server_files_through_mergekit(
    family: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubmerge import space
    from hubmerge.errors import ConfigError

    monkeypatch.setenv(space.SPACE_ENV, "1")
    with pytest.raises(ConfigError, match="not a Hub id; this shared Space only reads"):
        space.read_config_text(yaml.safe_dump(ties(family)))
    hub_only = json.loads(json.dumps(ties(family)).replace(str(family["base"]), "org/base"))
    for model in hub_only["models"]:
        model["model"] = "org/" + Path(model["model"]).name
    space.read_config_text(yaml.safe_dump(hub_only))
    hub_only["tokenizer"] = {"source": str(family["base"])}
    with pytest.raises(ConfigError, match="tokenizer: mergekit would read the models"):
        space.read_config_text(yaml.safe_dump(hub_only))
