"""The Space: its checks and previews, its API as gradio_client drives it, and its page in Chromium.

The app runs in this process on 127.0.0.1 (one server for the module); what differs between a
shared Space and a self-hosted one is read from the environment on every call, so tests switch
it with `HUBMERGE_SPACE`. Hub models come from the loopback `hub` server, with their files in a
Hub cache made for the test, since the test server serves no downloads.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from huggingface_hub import constants

from hubmerge import space
from hubmerge.config import loads_config
from hubmerge.errors import ConfigError, OutputError, SourceError
from hubmerge.hub import publish
from hubmerge.merge import merge
from hubmerge.sources import CONFIG_PATTERNS, ModelSource
from hubmerge.space import disk
from hubmerge.space import preview as previews
from tests.hubserver import TOKEN, HubServer
from tests.tinymodels import make_model

gr = pytest.importorskip("gradio", reason="the Space needs gradio: pip install -e '.[dev]'")
from gradio_client import Client  # noqa: E402 - gradio_client comes with gradio

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
#: Debian's chromium on a closed network: without the background-networking flags it hangs.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def app() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hubmerge_space_app", ROOT / "space" / "app.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def url(app: ModuleType) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.launch(
        prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True
    )
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(autouse=True)
def _self_hosted(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run as a self-hosted app unless they set HUBMERGE_SPACE; proxies stay away."""
    monkeypatch.delenv(space.SPACE_ENV, raising=False)
    monkeypatch.delenv("SYSTEM", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@pytest.fixture
def client(url: str) -> Client:
    return Client(url, verbose=False)


def block_expansion(model: Path | str, append: int = 1) -> str:
    return f"merge_method: block_expansion\nmodel: {model}\nappend: {append}\n"


# -- checks and previews, without a server --------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "phi3"])
def test_a_config_alone_gives_the_checkpoints_tensors(kind: str, tmp_path: Path) -> None:
    folder = make_model(kind, tmp_path / kind, dtype=torch.bfloat16)
    real = ModelSource.open(str(folder))
    previewed = previews.config_source("org/model", folder)

    expected = {n: (t.dtype, t.shape, t.nbytes) for n, t in real.tensors.items()}
    assert {n: (t.dtype, t.shape, t.nbytes) for n, t in previewed.tensors.items()} == expected


def test_preview_of_a_hub_model_fetches_only_its_config(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    only_config = tmp_path / "snapshot"
    only_config.mkdir()
    shutil.copy(models["llama12"] / "config.json", only_config)
    fetched: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(previews, "fetch", lambda ref, p: fetched.append((ref, p)) or only_config)
    text = """
        merge_method: passthrough
        slices:
          - sources: [{model: MODEL, layer_range: [0, 8]}]
          - sources:
              - model: MODEL
                layer_range: [6, 12]
                parameters: {scale: [{filter: o_proj, value: [1.5, 3.0]}]}
    """

    previewed = previews.preview(loads_config(text.replace("MODEL", "org/twelve"), "config"))

    assert fetched == [("org/twelve", CONFIG_PATTERNS)]
    local = loads_config(text.replace("MODEL", str(models["llama12"])), "config")
    planned = merge(local, tmp_path / "out", dry_run=True).plan
    assert previewed.plan is not None
    rows = [r[:1] + r[2:] for r in previewed.plan.rows()]
    assert rows == [r[:1] + r[2:] for r in planned.rows()]  # the same map, scales included
    assert previewed.plan.rows()[9] == ("8", "org/twelve", "6", "o_proj x1.5")


def test_a_shared_space_takes_hub_ids_only(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    local = block_expansion(models["llama"])
    space.read_config_text(local)  # self-hosted: a local folder is fine
    monkeypatch.setenv(space.SPACE_ENV, "1")
    with pytest.raises(ConfigError, match="not a Hub id; this shared Space only reads"):
        space.read_config_text(local)
    with pytest.raises(ConfigError, match="card.template: a path on the server"):
        space.read_config_text(block_expansion("org/model") + "card: {template: /etc/passwd}\n")
    olm = "merge_method: olm\nmodels: [org/a, org/b]\ndataset: {/etc/passwd: {mode: exact}}\n"
    with pytest.raises(ConfigError, match="dataset /etc/passwd: not a file in a Hub dataset repo"):
        space.read_config_text(olm)
    # OLM works on a shared Space, with datasets from Hub dataset repos.
    hub_data = olm.replace("/etc/passwd", "hf://datasets/org/evals/math.json")
    assert space.read_config_text(hub_data).merge_method == "olm"
    escape = olm.replace("/etc/passwd", "hf://datasets/org/evals/../../etc/passwd")
    with pytest.raises(ConfigError, match="not a file in a Hub dataset repo"):
        space.read_config_text(escape)
    space.read_config_text(block_expansion("org/model@v1.0"))


def test_a_merge_that_cannot_fit_on_the_disk_is_refused_before_downloading(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = loads_config(block_expansion(models["llama"], append=4), "config")
    previewed = previews.preview(config)
    weights = (models["llama"] / "model.safetensors").stat().st_size
    assert weights < previewed.output_bound(None) < 2 * weights  # 8 layers from 4

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=weights))
    with pytest.raises(OutputError, match=r"not enough disk space: this merge needs 0\.0 GB"):
        disk.check_disk(config, previewed, tmp_path)


def test_the_slice_table_has_buttons_to_add_and_remove_rows(app: ModuleType) -> None:
    demo = app.build_demo()
    labels = {block.value for block in demo.blocks.values() if isinstance(block, gr.Button)}
    assert {"Add slice", "Remove last slice"} <= labels  # what they do: tests/test_space_form.py


def test_the_space_folder_is_ready_to_push() -> None:
    text = (ROOT / "space" / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gr.__version__
    assert (ROOT / "space" / meta["app_file"]).is_file()
    assert meta["hf_oauth"] is True and "write-repos" in meta["hf_oauth_scopes"]
    assert len(meta["short_description"]) <= 60
    assert {"title", "emoji", "colorFrom", "colorTo", "license"} <= set(meta)
    requirements = (ROOT / "space" / "requirements.txt").read_text().splitlines()
    assert "hubmerge[space,mergekit]" in requirements


# -- the API, as gradio_client calls it ---------------------------------------------------------


def test_block_expansion_through_the_api(client: Client, models: dict[str, Path]) -> None:
    status, table = client.predict(block_expansion(models["llama"]), api_name="/validate")
    assert "Valid: 5 layers" in status
    assert [row[0] for row in table["data"]] == ["embed", "0", "1", "2", "3", "4", "head"]
    assert table["data"][5][2:] == ["3", "down_proj/o_proj x0"]

    status, log, card, files = client.predict(
        block_expansion(models["llama"]), "tiny-expanded", api_name="/merge"
    )
    assert "Merged **tiny-expanded**" in status
    assert "done: tiny-expanded" in log
    assert card.startswith("```yaml\n") and "- block_expansion\n" in card
    assert "# tiny-expanded\n" in card
    assert "| 4 | llama | 3 | down_proj/o_proj x0 |" in card  # the layer map
    assert "data:image/svg+xml;base64," in card
    names = sorted(Path(f).name for f in files)
    assert {"README.md", "mergekit_config.yml", "model.safetensors", "config.json"} <= set(names)


def test_errors_are_shown_inline(client: Client, models: dict[str, Path]) -> None:
    status, table = client.predict("merge_method: [", api_name="/validate")
    assert "**Error:** config: invalid YAML at line 1" in status and table["data"] == []

    typo = block_expansion(models["llama"]) + "zeros: [o_proj]\n"
    status, _ = client.predict(typo, api_name="/validate")
    assert "config: zeros: unknown key" in status

    status, log, card, files = client.predict("merge_method: ner\n", "x", api_name="/merge")
    assert "**Error:** config: base\\_model: Field required" in status
    assert card == "" and files is None

    status, *_ = client.predict(block_expansion(models["llama"]), "../up", api_name="/merge")
    assert "model name '../up'" in status


def test_a_shared_space_refuses_local_paths(
    client: Client, models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(space.SPACE_ENV, "1")
    status, _ = client.predict(block_expansion(models["llama"]), api_name="/validate")
    assert f"**Error:** {models['llama']}: not a Hub id" in status.replace("\\", "")
    status, *_ = client.predict(block_expansion(models["llama"]), "x", api_name="/merge")
    assert "not a Hub id" in status


@pytest.fixture
def hub_model(
    hub: HubServer, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """`org/tiny-base` on the loopback Hub, its files in a fresh Hub cache as if downloaded."""
    folder = Path(shutil.copytree(models["llama"], tmp_path / "tiny-base"))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny base\n")
    publish(folder, "org/tiny-base", token=TOKEN)
    commit = hub.repos["org/tiny-base"].commits[-1]["oid"]
    cache = tmp_path / "hub-cache"
    shutil.copytree(folder, cache / "models--org--tiny-base" / "snapshots" / commit)
    (cache / "models--org--tiny-base" / "refs").mkdir()
    (cache / "models--org--tiny-base" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return "org/tiny-base"


def test_a_shared_space_merges_and_publishes_a_hub_model(
    client: Client, hub: HubServer, hub_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(space.SPACE_ENV, "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)
    space.refuse_implicit_token()  # as `launch` does on a shared Space: HF_TOKEN is set here
    assert disk.hub_weights_size(hub_model) == len(hub.repos[hub_model].files["model.safetensors"])

    status, table = client.predict(block_expansion(hub_model, append=2), api_name="/validate")
    assert "Valid: 6 layers" in status and table["data"][-2][1] == hub_model
    _, _, card, _ = client.predict(block_expansion(hub_model, append=2), "grown", api_name="/merge")
    metadata = yaml.safe_load(card.split("```")[1].removeprefix("yaml\n"))
    assert metadata["base_model"] == [hub_model]
    assert metadata["base_model_relation"] == "merge"
    assert metadata["license"] == "apache-2.0"
    assert "| 5 | org/tiny-base | 3 | down_proj/o_proj x0 |" in card

    refused = client.predict("me/grown", False, "", api_name="/publish")
    assert "sign in with Hugging Face, or paste a token" in refused
    assert "me/grown" not in hub.repos
    published = client.predict("org/grown", True, TOKEN, api_name="/publish")
    assert f"Published (private): [{hub.url}/org/grown]" in published
    assert hub.repos["org/grown"].private
    assert {"model.safetensors", "README.md"} <= set(hub.repos["org/grown"].files)
    # The card that reached the Hub loads the model from there, not from the folder's name.
    published_card = hub.repos["org/grown"].files["README.md"].decode()
    assert 'model_id = "grown"' in card  # the preview: the folder's name, before a repo is known
    assert 'model_id = "org/grown"' in published_card and "# grown" in published_card
    wrong = client.predict("org/grown", False, TOKEN[:-1] + "x", api_name="/publish")
    assert "refused the token (401" in wrong and TOKEN[:-1] not in wrong
    assert "sign in with Hugging Face again" in wrong and "hf auth login" not in wrong


# -- the page, in a browser ---------------------------------------------------------------------


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install chromium"
)
def test_the_page_merges_a_model(url: str, models: dict[str, Path], tmp_path: Path) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.get_by_label("Block expansion").check()
            page.get_by_label("Model", exact=True).fill(str(models["llama"]))
            page.get_by_label("K or N").fill("2")
            page.get_by_label("Model name").fill("tiny-grown")
            editor = page.locator(".cm-content")
            page.wait_for_function(
                "p => document.querySelector('.cm-content').innerText.includes(p)",
                arg=f"model: {models['llama']}",
            )
            assert "append: 2" in editor.inner_text()
            page.get_by_role("button", name="Validate").click()
            page.get_by_text("Valid: 6 layers").wait_for()
            page.get_by_role("button", name="Merge", exact=True).click()
            card = page.locator("#card")
            card.get_by_role("heading", name="Layer map").wait_for(timeout=60_000)
            text = card.inner_text()
            shot = tmp_path / "space.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / "space.png")
    assert "# tiny-grown" not in text and "tiny-grown" in text  # rendered, not raw Markdown
    assert re.search(r"5\s+llama\s+3\s+down_proj/o_proj x0", text)
    assert "block_expansion" in text  # the metadata block


def test_a_failed_job_reports_its_error_and_leaves_nothing(tmp_path: Path) -> None:
    job = space.MergeJob(loads_config(block_expansion(tmp_path / "missing"), "c"), "x")
    assert job.wait(60)
    assert isinstance(job.error, SourceError) and "no such model folder" in str(job.error)
    job.close()
    assert not job.folder.exists()
    other = tmp_path / "not-a-job" / "model"
    other.mkdir(parents=True)
    space.discard(other)  # only folders jobs made are ever removed
    assert other.exists()
