"""Tokens: one with a line break or control character inside is refused before any request,
without being shown, and every form a message may quote a token in is scrubbed.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest

from hubmerge.errors import HubError
from hubmerge.hub import check_token_text, resolve_token, scrub
from tests.helpers import run_cli
from tests.hubserver import HubServer
from tests.test_publish import merged, model_dir  # noqa: F401 - fixtures

SECRET = "hf_Secret42Token"


@pytest.mark.parametrize(
    "token",
    [f"{SECRET}\nmore", f"{SECRET}\rmore", f"{SECRET} more", f"{SECRET}\tx", f"{SECRET}\x00x"],
    ids=["newline", "return", "space", "tab", "nul"],
)
def test_a_token_with_a_line_break_is_refused_unseen(
    model_dir: Path,  # noqa: F811 - the fixture
    hub: HubServer,
    token: str,
) -> None:
    result = run_cli("publish", model_dir, "--repo-id", "org/x", "--token", token)
    assert result.exit_code == 2, result.output
    line = result.output.strip()
    assert len(line.splitlines()) == 1 and line.startswith("error: the Hub token has a line break")
    for part in (SECRET, "more", "Secret42"):
        assert part not in line
    assert hub.requests == []  # refused before anything was sent


def test_the_environments_token_is_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub drops line breaks from HF_TOKEN itself; other control characters stay.
    monkeypatch.setenv("HF_TOKEN", f"{SECRET}\t{SECRET}")
    with pytest.raises(HubError, match="it is not shown here") as refused:
        resolve_token(None)
    assert SECRET not in str(refused.value)


def test_surrounding_whitespace_is_only_trimmed() -> None:
    assert resolve_token(f"  {SECRET}\n") == SECRET
    assert check_token_text(SECRET) == SECRET


def test_every_form_of_a_token_is_scrubbed() -> None:
    token = 'hf_a"b\\c\nd/é'
    forms = [token, repr(token), json.dumps(token), quote(token, safe=""), repr(token.encode())]
    text = " | ".join(f"sent {form}" for form in forms)
    cleaned = scrub(text, token)
    assert cleaned.count("***") == len(forms)
    for piece in ("hf_a", "b\\c", "d/é"):
        assert piece not in cleaned
    assert scrub("nothing to hide", "") == "nothing to hide"
