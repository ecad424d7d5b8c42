"""The shared Space under hostile requests, through its real Gradio API.

Models are Hub ids resolved from a Hub cache made for the test (`HF_HUB_OFFLINE=1`): one whose
shard index points outside its folder, one that declares a million layers, and a valid one. A
visitor's merge of the valid one runs (held up on purpose) while another visitor validates and
merges the hostile ones: each is refused at once, and the first visitor's merge still completes.
Each validation and merge runs in a subprocess with its own time and memory budget (`Budgeted`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from huggingface_hub import constants

from hubmerge import space
from hubmerge.errors import BudgetError
from hubmerge.space import jobs
from tests.helpers import cache_repo
from tests.test_space import _self_hosted, app, block_expansion, url  # noqa: F401 - fixtures

gradio_client = pytest.importorskip("gradio_client", reason="the Space needs gradio")
Client = gradio_client.Client


@pytest.fixture
def hub_cache(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    cache = tmp_path / "hub-cache"
    cache_repo(cache, "org/tiny", models["llama"])
    escape = cache_repo(cache, "org/escape", models["llama"])
    secret = Path(shutil.copytree(models["llama_b"], tmp_path / "server-files"))
    weight_map = {"model.embed_tokens.weight": str(secret / "model.safetensors")}
    weight_map["lm_head.weight"] = "../../../../server-files/model.safetensors"
    index = {"metadata": {}, "weight_map": weight_map}
    (escape / "model.safetensors.index.json").write_text(json.dumps(index))
    deep = cache_repo(cache, "org/deep", models["llama"])
    config = json.loads((deep / "config.json").read_text())
    (deep / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 1_000_000}))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(space.SPACE_ENV, "1")
    return {
        "escape": block_expansion("org/escape"),
        "deep": block_expansion("org/deep"),
        "huge": block_expansion("org/tiny", append=100_000_000),
    }


NEEDLES = {
    "escape": "is not a plain name inside the model folder",
    "deep": "org/deep: config.json: num\\_hidden\\_layers must be an integer from 1 to 10,000",
    "huge": "append: Input should be less than or equal to 10000",
}


def test_hostile_requests_are_refused_while_another_merge_runs(
    url: str,  # noqa: F811 - the fixture
    hub_cache: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first visitor's merge is held up in its subprocess (which inherits this patch),
    # where it would check the disk, so that it is surely running during the others' requests.
    monkeypatch.setattr(jobs, "check_disk", lambda *args: time.sleep(15))
    first = Client(url, verbose=False).submit(
        block_expansion("org/tiny", append=2), "grown", None, api_name="/merge"
    )
    # Running once past the queue: PROCESSING can be too brief to poll before the job reports
    # its progress (PROGRESS, ITERATING, LOG).
    waiting = {"STARTING", "JOINING_QUEUE", "IN_QUEUE", "SENDING_DATA"}
    deadline = time.monotonic() + 60
    while first.status().code.name in waiting and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # past its checks, into the job itself
    assert not first.done()

    other = Client(url, verbose=False)
    for case, text in hub_cache.items():
        start = time.monotonic()
        status, table = other.predict(text, api_name="/validate")
        assert "**Error:**" in status and NEEDLES[case] in status, (case, status)
        assert table["data"] == []
        status, log, card, files = other.predict(text, case, api_name="/merge")
        assert "**Error:**" in status and NEEDLES[case] in status, (case, status)
        assert card == "" and files is None
        took = time.monotonic() - start
        print(f"{case}: refused in {took:.2f} s")
        assert took < 30  # refused, not queued behind the running merge
        assert not first.done()
    status, log, card, _ = first.result(timeout=120)
    assert "Merged **grown**" in status, status
    assert "| 5 | org/tiny | 3 | down_proj/o_proj x0 |" in card


def test_a_job_over_its_time_is_stopped() -> None:
    start = time.monotonic()
    job = space.Budgeted(time.sleep, (60,), {}, 1, 2**30)
    assert job.wait(30)
    assert isinstance(job.error, BudgetError) and "stopped after 1 s" in str(job.error)
    assert time.monotonic() - start < 20


def _allocate(nbytes: int) -> int:
    return len(bytearray(nbytes))


def test_a_job_over_its_memory_is_stopped() -> None:
    job = space.Budgeted(_allocate, (4 * 2**30,), {}, 60, 256 * 2**20)
    assert job.wait(60)
    assert isinstance(job.error, BudgetError) and "over the memory" in str(job.error)
    within = space.Budgeted(_allocate, (64 * 2**20,), {}, 60, 256 * 2**20)
    assert within.wait(60) and within.error is None and within.result == 64 * 2**20


def test_a_job_reports_its_errors_as_they_were() -> None:
    job = space.Budgeted(space.read_config_text, ("merge_method: [",), {}, 60, 2**30)
    assert job.wait(60)
    assert "config: invalid YAML at line 1" in str(job.error)
