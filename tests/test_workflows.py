"""The GitHub workflows, the composite action and the example model repository.

GitHub Actions cannot run here, so the files are checked for what GitHub requires of them, every
`hubmerge` command and flag they (and the README) call is checked against the CLI itself, and
the action's own shell steps run, in order, against a copy of examples/model-repo, publishing to
the loopback Hub: the action cannot drift from the CLI without failing here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

from hubmerge.cli import app
from tests.example_repo import EXAMPLE, ignored, make_donors
from tests.hubserver import TOKEN, HubServer, Repo

ROOT = Path(__file__).resolve().parents[1]
ACTION = ROOT / "action.yml"
REUSABLE = ROOT / ".github" / "workflows" / "model-card.yml"
CI = ROOT / ".github" / "workflows" / "ci.yml"
CALLER = EXAMPLE / ".github" / "workflows" / "cards.yml"
MODELS = ("tiny-frankenmerge", "tiny-pro")
REPOS = {name: f"your-org/{name}" for name in MODELS}
EXPRESSION = re.compile(r"\$\{\{\s*(.*?)\s*\}\}", re.DOTALL)


def load(path: Path) -> dict[str, Any]:
    """A workflow or action file; YAML 1.1 reads the key `on` as True, so it is put back."""
    data = yaml.safe_load(path.read_text())
    if True in data:
        data["on"] = data.pop(True)
    return data


def action_steps() -> list[dict[str, Any]]:
    return load(ACTION)["runs"]["steps"]


def scripts() -> dict[str, str]:
    """Every `run:` script of the action and the workflows, by where it is."""
    steps = enumerate(action_steps())
    found = {f"action.yml#{s.get('id', i)}": s["run"] for i, s in steps if "run" in s}
    for path in (CI, REUSABLE):
        for job_name, job in load(path)["jobs"].items():
            for i, step in enumerate(job.get("steps", [])):
                if "run" in step:
                    found[f"{path.name}#{job_name}.{i}"] = step["run"]
    return found


# -- the files say what GitHub needs -----------------------------------------------------------


def test_the_action_is_composite_and_documents_its_inputs() -> None:
    action = load(ACTION)
    assert action["runs"]["using"] == "composite"
    assert {"name", "description"} <= action.keys()
    for name, spec in action["inputs"].items():
        assert spec.get("description"), f"input {name} has no description"
        assert isinstance(spec.get("default"), str), f"input {name} needs a string default"
    for step in action_steps():
        assert "uses" in step or step.get("shell") == "bash", step  # composite run steps need it


def test_the_reusable_workflow_passes_every_action_input() -> None:
    workflow = load(REUSABLE)
    call = workflow["on"]["workflow_call"]
    assert call["secrets"]["HF_TOKEN"]["required"] is False
    assert workflow["permissions"] == {"contents": "read", "id-token": "write"}
    job = workflow["jobs"]["cards"]
    assert "github.repository" in job["concurrency"]["group"]
    assert "pull_request" in job["concurrency"]["cancel-in-progress"]
    assert job["runs-on"] == "${{ inputs.runs-on }}"
    assert "download.pytorch.org/whl/cpu" in job["env"]["PIP_EXTRA_INDEX_URL"]
    checkout, action = job["steps"]
    assert checkout["uses"].startswith("actions/checkout@")
    assert action["uses"] == "$/"  # the action at this workflow's own revision
    inputs = load(ACTION)["inputs"]
    assert action["with"].keys() == inputs.keys()
    for name, value in action["with"].items():
        source = "secrets.HF_TOKEN" if name == "hf-token" else f"inputs.{name}"
        assert value == f"${{{{ {source} }}}}"
        if name != "hf-token":
            assert (
                str(call["inputs"][name].get("default", "")).lower() == (inputs[name]["default"])
            ), f"{name}: the workflow's default differs from the action's"


def test_the_example_caller_grants_what_the_reusable_workflow_asks() -> None:
    caller, called = load(CALLER), load(REUSABLE)
    assert {"pull_request", "push", "release"} <= caller["on"].keys()
    job = caller["jobs"]["cards"]
    assert job["uses"].split("@")[0].endswith("/.github/workflows/model-card.yml")
    assert job["with"].keys() <= called["on"]["workflow_call"]["inputs"].keys()
    assert job["secrets"].keys() <= called["on"]["workflow_call"]["secrets"].keys()
    # A called workflow that asks for more than its caller grants is refused by GitHub.
    assert caller["permissions"] == called["permissions"]


def test_ci_runs_ruff_and_the_readme_test_command_on_each_python() -> None:
    ci = load(CI)
    assert {"push", "pull_request"} <= ci["on"].keys()
    assert ci["permissions"] == {"contents": "read"}
    assert "concurrency" in ci
    lint, test = ci["jobs"]["lint"], ci["jobs"]["test"]
    assert {"ruff check .", "ruff format --check ."} <= {s.get("run") for s in lint["steps"]}
    assert test["strategy"]["matrix"]["python-version"] == ["3.10", "3.11", "3.12"]
    assert "download.pytorch.org/whl/cpu" in test["env"]["PIP_EXTRA_INDEX_URL"]
    assert test["steps"][-1]["run"] == "bash .ci/run"
    setup = next(s for s in test["steps"] if s.get("uses", "").startswith("actions/setup-python"))
    assert setup["with"]["python-version"] == "${{ matrix.python-version }}"


def test_expressions_never_reach_a_script() -> None:
    """`${{ }}` in a script is pasted in before bash runs: a branch name could run code."""
    for where, script in scripts().items():
        assert "${{" not in script, where


# -- every hubmerge command and flag they call exists ------------------------------------------


def hubmerge_calls(script: str) -> list[tuple[list[str], set[str]]]:
    """Each `hubmerge` call in a shell script: its words after `hubmerge` and every flag it
    passes, those passed through an array built in the script (`args+=(--check)`) included."""
    arrays: dict[str, set[str]] = {}
    for name, items in re.findall(r"(\w+)\+?=\(([^)]*)\)", script):
        arrays.setdefault(name, set()).update(re.findall(r"--[\w-]+", items))
    calls = []
    for line in script.splitlines():
        match = re.search(r"(?:^|[\s;&|(`])hubmerge\s+(.*)", line)
        if not match or line.lstrip().startswith("#"):
            continue
        rest = match[1]
        flags = set(re.findall(r"(?<![\w-])--[\w-]+", rest))
        for array in re.findall(r"\$\{(\w+)\[@\]\}", rest):
            flags |= arrays.get(array, set())
        calls.append((rest.split(), flags))
    return calls


def readme_ci_scripts() -> dict[str, str]:
    """The shell code blocks of the README's "Model cards in CI" section."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"\n## Model cards in CI\n(.*?)(?=\n## |\Z)", readme, re.DOTALL)
    assert section, "README.md has no '## Model cards in CI' section"
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", section[1], re.DOTALL)
    return {f"README.md (Model cards in CI) block {i}": block for i, block in enumerate(blocks)}


def resolve(words: list[str]) -> tuple[str, Any]:
    """The command `hubmerge WORDS...` runs, and its name; an assertion error if there is none.

    Typer's commands are click's (vendored): a group has `commands`, a command `params`.
    """
    current, path = typer.main.get_command(app), []
    for word in words:
        if not hasattr(current, "commands") or word.startswith("-"):
            break
        assert word in current.commands, f"`hubmerge {' '.join([*path, word])}`: no such command"
        current = current.commands[word]
        path.append(word)
    return " ".join(path), current


@pytest.mark.parametrize("source", ["workflows", "README"])
def test_every_hubmerge_command_and_flag_exists(source: str) -> None:
    found = scripts() if source == "workflows" else readme_ci_scripts()
    calls = [(where, call) for where, script in found.items() for call in hubmerge_calls(script)]
    assert calls, "no hubmerge calls found: the parser is broken"
    for where, (words, flags) in calls:
        name, command = resolve(words)
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        assert flags <= known, f"{where}: `hubmerge {name}` has no {sorted(flags - known)}"


def test_the_call_parser_sees_array_flags_and_skips_comments() -> None:
    script = 'args=()\nargs+=(--all "$f")\nhubmerge card "${args[@]}" --check\n# hubmerge no\n'
    assert hubmerge_calls(script) == [(["card", '"${args[@]}"', "--check"], {"--all", "--check"})]
    assert resolve(["card", "x"])[0] == "card"
    with pytest.raises(AssertionError, match="no such command"):
        resolve(["crad"])


# -- the example model repository --------------------------------------------------------------


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """A copy of the example model repository, as a git checkout of it holds it."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "model-repo"))


def test_the_example_keeps_no_weights_and_stays_small() -> None:
    files = [p for p in EXAMPLE.rglob("*") if p.is_file()]
    assert not [p for p in files if ignored(p.name)]
    assert sum(p.stat().st_size for p in files) < 64_000
    for name in MODELS:
        config = yaml.safe_load((EXAMPLE / "models" / name / "config.yaml").read_text())
        assert config["hub"]["repo_id"] == REPOS[name]


def test_the_example_cards_are_fresh_then_stale_after_an_edit(example: Path) -> None:
    models = example / "models"
    result = run_hubmerge(example, "card", "--all", "models", "--check")
    assert result.returncode == 0, (
        f"{result.stdout}{result.stderr}\nThe example's committed cards are stale: run "
        "`hubmerge card --all examples/model-repo/models` (or, after a change to what a merge "
        "writes, `python -m tests.example_repo`) and commit the result."
    )
    assert result.stdout.splitlines() == [f"fresh   models/{name}" for name in MODELS]

    card = models / "tiny-pro" / "README.md"
    card.write_text(card.read_text().replace("# tiny-pro", "# tiny-pro, edited by hand"))
    result = run_hubmerge(example, "card", "--all", "models", "--check")
    assert result.returncode == 1
    assert "fresh   models/tiny-frankenmerge" in result.stdout
    assert "stale   models/tiny-pro: README.md" in result.stdout
    assert "-# tiny-pro, edited by hand\n+# tiny-pro" in result.stdout


def run_hubmerge(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The installed `hubmerge` command, as CI runs it."""
    command = [str(Path(sys.executable).parent / "hubmerge"), *args]
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_ACTIONS"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


# -- the action's steps, run against the example -----------------------------------------------


@dataclass
class StepRun:
    id: str
    returncode: int
    output: str


def run_action(
    repo: Path,
    *,
    event: str,
    ref: str = "refs/heads/main",
    inputs: Mapping[str, str] | None = None,
    steps: tuple[str, ...] | None = None,
) -> dict[str, StepRun]:
    """Run the action's shell steps in order, as a runner would, until one fails.

    Expressions in a step's `env:` are replaced by what GitHub would put there; an expression
    this function does not know fails the test. `uses:` steps (setup-python) and the install
    step (pip has nothing to fetch here: hubmerge is installed) are left out. Workflow commands
    the steps rely on are emulated: `GITHUB_ENV` carries variables to the steps after.
    """
    defaults = {name: spec["default"] for name, spec in load(ACTION)["inputs"].items()}
    inputs = dict(inputs or {})
    assert inputs.keys() <= defaults.keys(), "the test passes an input the action does not have"
    context = {f"inputs.{name}": value for name, value in (defaults | inputs).items()}
    context |= {
        "github.event_name": event,
        "github.ref": ref,
        "github.event.repository.default_branch": "main",
    }
    runner = repo.parent / "runner"
    runner.mkdir(exist_ok=True)
    github_env = runner / "github_env"
    github_env.write_text("")
    # Not the runner's own workflow-command files when hubmerge's CI runs this on GitHub.
    outside = {k: v for k, v in os.environ.items() if not k.startswith(("GITHUB_", "RUNNER_"))}
    base = outside | {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "GITHUB_ACTIONS": "true",
        "GITHUB_ENV": str(github_env),
        "RUNNER_TEMP": str(runner),
        "HF_HOME": str(runner / "hf"),
        "HF_HUB_DISABLE_XET": "1",  # the loopback Hub speaks the regular upload protocol
    }
    ran: dict[str, StepRun] = {}
    for step in action_steps():
        if "uses" in step or step["id"] == "install" or (steps and step["id"] not in steps):
            continue
        step_env = {
            k: EXPRESSION.sub(lambda m: context[m[1]], v) for k, v in step.get("env", {}).items()
        }
        carried = dict(line.split("=", 1) for line in github_env.read_text().splitlines())
        script = runner / f"{step['id']}.sh"
        script.write_text(step["run"])
        done = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)],
            cwd=repo,
            env=base | carried | step_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        ran[step["id"]] = StepRun(step["id"], done.returncode, done.stdout + done.stderr)
        assert TOKEN not in done.stdout + done.stderr
        if done.returncode != 0:
            break
    return ran


def test_the_install_step_installs_the_actions_own_revision() -> None:
    """The one step the runs below leave out: it installs, from PyPI or this checkout."""
    install = next(s for s in action_steps() if s.get("id") == "install")
    assert install["env"] == {
        "VERSION": "${{ inputs.hubmerge-version }}",
        "ACTION_PATH": "${{ github.action_path }}",
    }
    assert 'python -m pip install --quiet "$spec"' in install["run"]


@pytest.mark.parametrize(
    ("event", "ref", "inputs", "mode"),
    [
        ("pull_request", "refs/pull/7/merge", {}, "check"),
        ("push", "refs/heads/feature", {}, "check"),
        ("push", "refs/heads/main", {}, "publish"),
        ("workflow_dispatch", "refs/heads/main", {}, "publish"),
        ("release", "refs/tags/v1.0", {}, "publish"),
        ("push", "refs/heads/main", {"publish": "none"}, "check"),
        ("pull_request", "refs/pull/7/merge", {"mode": "publish"}, "publish"),
    ],
)
def test_the_mode_follows_the_event(
    example: Path, event: str, ref: str, inputs: dict[str, str], mode: str
) -> None:
    ran = run_action(example, event=event, ref=ref, inputs=inputs, steps=("select",))
    assert ran["select"].returncode == 0, ran["select"].output
    env = (example.parent / "runner" / "github_env").read_text()
    assert f"HUBMERGE_MODE={mode}\n" in env
    assert "HUBMERGE_FOLDERS=models/tiny-frankenmerge models/tiny-pro\n" in env


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"publish": "everything"}, "::error::publish: expected card-only, folder or none"),
        ({"mode": "sometimes"}, "::error::mode: expected auto, check or publish"),
        ({"models-dir": "nowhere"}, "::error::no model folders in nowhere"),
    ],
)
def test_bad_inputs_stop_the_action(example: Path, inputs: dict[str, str], expected: str) -> None:
    ran = run_action(example, event="push", inputs=inputs)
    assert ran["select"].returncode == 2
    assert expected in ran["select"].output
    assert "cards" not in ran


def test_a_pull_request_checks_the_cards(example: Path) -> None:
    ran = run_action(example, event="pull_request", ref="refs/pull/7/merge")
    assert [r.returncode for r in ran.values()] == [0, 0, 0], ran
    assert "fresh   models/tiny-pro" in ran["cards"].output
    assert "nothing to publish" in ran["publish"].output

    config = example / "models" / "tiny-pro" / "config.yaml"
    config.write_text(config.read_text().replace("tags: [example]", "tags: [example, pro]"))
    ran = run_action(example, event="pull_request", ref="refs/pull/7/merge")
    assert ran["cards"].returncode == 1
    assert "publish" not in ran
    output = ran["cards"].output
    assert "stale   models/tiny-pro: hubmerge_config.yml" in output
    assert "+  tags: [example, pro]" in output
    assert "::error file=models/tiny-pro/hubmerge_config.yml,title=Stale model card::" in output


def test_the_models_input_picks_folders(example: Path) -> None:
    ran = run_action(example, event="pull_request", inputs={"models": "tiny-pro"})
    assert ran["cards"].returncode == 0, ran["cards"].output
    assert "tiny-frankenmerge" not in ran["cards"].output


def test_a_push_to_main_publishes_each_card_once(example: Path, hub: HubServer) -> None:
    for repo in REPOS.values():  # published earlier, with the weights
        hub.repos[repo] = Repo(private=False)
        hub.repos[repo].files["model.safetensors"] = b"weights"
    inputs = {"hf-token": TOKEN}

    ran = run_action(example, event="push", inputs=inputs)
    assert [r.returncode for r in ran.values()] == [0, 0, 0], ran
    for name, repo in REPOS.items():
        folder = example / "models" / name
        assert f"published the card of {hub.url}/{repo}" in ran["publish"].output
        assert hub.repos[repo].files == {
            "model.safetensors": b"weights",
            "README.md": (folder / "README.md").read_bytes(),
            "layer_map.svg": (folder / "layer_map.svg").read_bytes(),
        }

    ran = run_action(example, event="push", inputs=inputs)
    assert ran["publish"].returncode == 0, ran["publish"].output
    assert ran["publish"].output.count("unchanged") == 2
    assert [len(hub.repos[repo].commits) for repo in REPOS.values()] == [1, 1]


def test_publishing_a_folder_merges_it_on_the_runner(example: Path, hub: HubServer) -> None:
    """The whole model, merged from config.yaml (the donors are where the configs say)."""
    make_donors(example)
    inputs = {"hf-token": TOKEN, "publish": "folder", "models": "tiny-frankenmerge"}
    ran = run_action(example, event="release", ref="refs/tags/v1.0", inputs=inputs)
    assert ran["publish"].returncode == 0, ran["publish"].output

    folder = example / "models" / "tiny-frankenmerge"
    stored = hub.repos[REPOS["tiny-frankenmerge"]].files
    assert "model.safetensors" in stored
    assert stored["results/tiny_add.json"] == (folder / "results" / "tiny_add.json").read_bytes()
    # The same donors give the same merge, so the card made on the runner is the committed one.
    assert stored["README.md"] == (folder / "README.md").read_bytes()
    assert hub.unknown == []
