"""Publish a model folder to the Hugging Face Hub: the Python API behind `hubmerge publish`.

Publishing is `create_repo(exist_ok=True)` (plus `create_branch` for `revision`) and one
`upload_folder` of everything in the folder: weights, config, tokenizer, card, recipe, reports
and images; weight files the folder no longer has are deleted in the same commit. With
`card_only`, only the card and its images go, to a repo that must exist (CI updates the card of
a model published earlier, from a git checkout without weights). The card that goes is the
one for the repo it goes to (`card_for_repo`). Each Hub request is retried on transient
failures (5xx, 429, connection errors), once, with huggingface_hub's policy (`RetryPolicy`:
up to 6 tries, waiting 1, 2, 4, 8, 8 s), each retry one line; and running an upload again
is safe: the Hub skips files it already holds, so a retry, or running the command again, resumes
instead of starting over; when it holds them all, no commit is made and the result says so.

The token (`token=`, else `HF_TOKEN`, else the stored login; or, with `oidc`, one the Hub's
Trusted Publishers exchange for the CI job's OIDC identity) is only handed to the client: it is
never printed or written, and it is scrubbed from every error message, since Hub and HTTP errors
may quote request details.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import yaml
from huggingface_hub import HfApi, ModelCard, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled, RevisionNotFoundError
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import (
    DEFAULT_IGNORE_PATTERNS,
    HFValidationError,
    filter_repo_objects,
    validate_repo_id,
)

from hubmerge import __version__, arch
from hubmerge.card.results import is_results, shareable_results
from hubmerge.config import HubSettings, load_config
from hubmerge.errors import CardError, HubError, TokenError
from hubmerge.folder import (
    CARD_FILE,
    CARD_FILES,
    CONFIG_FILE,
    EVAL_RESULTS_FILE,
    MODEL_CONFIG_FILE,
    PLAN_FILE,
    PublicNames,
    results_files,
)

T = TypeVar("T")

#: Local bookkeeping (such as `hubmerge run`'s state file) that never goes to the Hub, and what
#: a write killed before its rename leaves (`folder.partial_name`).
LOCAL_ONLY_PATTERNS = [".hubmerge*", ".*.partial-*"]
#: Weights on the Hub that the folder no longer has are deleted in the same commit: a re-merged
#: model must never mix old and new shards (a stale index file would even load them).
STALE_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]
#: Weight files themselves: a whole folder published without any is refused (see `upload_files`).
WEIGHT_PATTERNS = ["*.safetensors", "*.bin"]
#: Files that may name local donors by path, rewritten by `shareable_copy`.
_TEXT_SUFFIXES = frozenset({".json", ".yml", ".yaml", ".md"})
#: How huggingface_hub spells "on" in environment variables.
_TRUE = frozenset({"1", "ON", "YES", "TRUE"})
#: HTTP statuses worth another try: the Hub or a proxy is briefly unwell, or rate-limits.
TRANSIENT_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: Connection and timeout errors, by class name: httpx's `TransportError`, requests'
#: `ConnectionError`/`Timeout` and the builtins, whichever HTTP client huggingface_hub uses.
_TRANSPORT_ERRORS = frozenset({"TransportError", "ConnectionError", "Timeout", "TimeoutError"})


@dataclass(frozen=True)
class RetryPolicy:
    """How often a transient Hub failure is retried: `tries` in all, waits doubling.

    The default is huggingface_hub's own (`http_backoff`: 5 retries, waiting 1, 2, 4, 8 and
    8 s), which the client applies itself to the upload's preupload requests: those are not
    retried again here (see `_HubCaller`), so every request has one retry layer, one policy.
    """

    tries: int = 6
    delay: float = 1.0
    max_delay: float = 8.0


#: The policy `publish` uses when given none (tests swap in one without waits).
RETRY = RetryPolicy()


@dataclass(frozen=True)
class UploadFile:
    path: str
    size: int


@dataclass(frozen=True)
class PublishResult:
    """What was (or, on a dry run, would be) published, and where."""

    repo_id: str
    #: The model page (the branch's page when a revision is given).
    url: str
    files: tuple[UploadFile, ...]
    #: The model card's YAML metadata; None when the folder has no README.md.
    frontmatter: dict[str, Any] | None
    private: bool
    dry_run: bool
    commit_url: str | None = None
    pr_url: str | None = None
    #: Whether a commit was made: False when the Hub already held every file; None on a dry run.
    changed: bool | None = None
    card_only: bool = False


def publish(
    model_dir: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    oidc: bool = False,
    card_only: bool = False,
    dry_run: bool = False,
    endpoint: str | None = None,
    retry: RetryPolicy | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> PublishResult:
    """Create `repo_id` if needed and upload `model_dir` to it in one commit (or one PR).

    `card_only` uploads only the card and its images (`CARD_FILES`) to an existing repo, and
    deletes nothing. `oidc` gets the token from the Hub's Trusted Publishers (see
    `resolve_token`). A dry run checks the folder and the card's metadata and lists what would be
    uploaded, without a token or the network. `endpoint` defaults to `HF_ENDPOINT` as set now
    (huggingface_hub reads it only at import). `log` hears about retries.
    """
    model_dir = Path(model_dir)
    check_repo_id(repo_id)
    if create_pr and revision:
        raise HubError("--revision and --create-pr exclude each other (a PR targets main)")
    files = upload_files(model_dir, card_only=card_only)
    card = card_for_repo(model_dir, repo_id)
    if card is None:
        frontmatter = read_frontmatter(model_dir)
    else:  # the card that will reach the Hub, rendered for this repo
        frontmatter = _frontmatter(card, model_dir / CARD_FILE)
        size = len(card.encode("utf-8"))
        files = tuple(UploadFile(f.path, size) if f.path == CARD_FILE else f for f in files)
    endpoint = _endpoint(endpoint)
    url = f"{endpoint}/{repo_id}" + (f"/tree/{quote(revision, safe='')}" if revision else "")
    result = PublishResult(repo_id, url, files, frontmatter, private, dry_run, card_only=card_only)
    if dry_run:
        return result

    check_online()
    token = resolve_token(token, oidc_repo=repo_id if oidc else None)
    api = _api(endpoint, token)
    call = _HubCaller(repo_id, token, retry or RETRY, log)
    if not card_only:  # a card alone must not create a repo that looks like a model
        call(lambda: api.create_repo(repo_id, private=private, exist_ok=True))
    if revision:
        call(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True))
    # The client makes no commit when the Hub holds every file already, and then answers with
    # the head commit: comparing with the head before tells "unchanged" from "published".
    head = call(lambda: api.repo_info(repo_id, revision=revision)).sha
    title = f"Upload {repo_id.split('/')[1]}{' card' if card_only else ''} with hubmerge"
    replaced = {CARD_FILE: card} if card is not None else {}
    with shareable_copy(model_dir, replaced) as folder, _client_log(call):
        commit = call(
            lambda: api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or title,
                revision=revision,
                create_pr=create_pr,
                allow_patterns=[f.path for f in files] if card_only else None,
                ignore_patterns=list(LOCAL_ONLY_PATTERNS),
                delete_patterns=None if card_only else list(STALE_WEIGHT_PATTERNS),
            )
        )
    return replace(
        result, commit_url=commit.commit_url, pr_url=commit.pr_url, changed=commit.oid != head
    )


def configured_hub(model_dir: Path) -> HubSettings:
    """The `hub:` section of the folder's `hubmerge_config.yml` (empty settings without one)."""
    path = Path(model_dir) / CONFIG_FILE
    config = load_config(path) if path.is_file() else None
    return (config.hub if config else None) or HubSettings()


def card_for_repo(model_dir: Path, repo_id: str) -> str | None:
    """The model card to publish to `repo_id` instead of the folder's, or None to keep that one.

    A card names the model it is for in its title and its usage snippet (`model_id = "..."`):
    the folder's name, or the config's `hub.repo_id`. Published elsewhere (`--repo-id`, the
    Space's repository box), the card is rendered again for the repo, from the same inputs:
    the folder's own results (`results/*.json`, or `hubmerge run`'s) or none, whichever
    reproduces the card on disk. A card that cannot be reproduced so (edited by hand, or
    rendered with results from elsewhere) is kept, unless its snippet loads another model:
    that is an error saying how to render it for the repo.
    """
    from hubmerge.card.render import render_card

    model_dir = Path(model_dir)
    path = model_dir / CARD_FILE
    if not (model_dir / PLAN_FILE).is_file() or not path.is_file():
        return None  # not a hubmerge model, or no card: nothing to render
    on_disk = path.read_text(encoding="utf-8")
    own = [model_dir / EVAL_RESULTS_FILE] if (model_dir / EVAL_RESULTS_FILE).is_file() else []
    for results in ([], results_files(model_dir), own):
        try:
            if render_card(model_dir, results=results) == on_disk:
                fresh = render_card(model_dir, results=results, repo_id=repo_id)
                return fresh if fresh != on_disk else None
        except CardError:
            continue
    named = re.search(r'model_id = "([^"]+)"', on_disk)
    if named and named.group(1) != repo_id:
        raise HubError(
            f"{path}: its usage snippet loads {named.group(1)!r}, not {repo_id}, and it is not "
            "a card hubmerge can render again from this folder alone: render it for the repo "
            f"with `hubmerge card {model_dir} --repo-id {repo_id}` (and the --results it "
            "shows), then publish"
        )
    return None


@contextlib.contextmanager
def shareable_copy(model_dir: Path, replaced: dict[str, str] | None = None) -> Iterator[Path]:
    """The folder as the Hub should see it: nothing of this machine in any text file.

    Recipes, plans and reports name local donors as the user wrote them (often an absolute path,
    which can hold a user name); on the Hub each becomes the folder name the card already uses.
    The folder's own path becomes its name, and paths under the home folder start with `~/`.
    lm-eval results files lose what lm-eval records about the machine (`shareable_results`);
    the full file stays in the folder. Files are linked, not copied, so weights cost nothing;
    only rewritten text files are new. `replaced` gives the text of files (by relative path)
    that go to the Hub instead of the folder's: the card rendered for the repo.
    """
    replaced = replaced or {}
    model_dir = Path(model_dir)
    names = PublicNames.of(model_dir)
    with tempfile.TemporaryDirectory(prefix="hubmerge-publish-") as tmp:
        for file in sorted(p for p in model_dir.rglob("*") if p.is_file()):
            name = file.relative_to(model_dir).as_posix()
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if name in replaced or (
                file.suffix in _TEXT_SUFFIXES and file.name not in arch.VOCABULARY_FILES
            ):
                # Bytes that are not UTF-8 pass through unchanged.
                text = replaced.get(name) or file.read_text(
                    encoding="utf-8", errors="surrogateescape"
                )
                shared = _shareable_json(text, model_dir)
                shared = names.text(shared)
                if shared != text or name in replaced:
                    target.write_text(shared, encoding="utf-8", errors="surrogateescape")
                    continue
            target.symlink_to(file.resolve())
        yield Path(tmp)


def _shareable_json(text: str, model_dir: Path) -> str:
    """`text` itself, or the shareable copy of it when it is an lm-eval results file."""
    if '"results"' not in text:  # cheap: most JSON files are not results
        return text
    try:
        data = json.loads(text)
    except ValueError:
        return text
    if not is_results(data):
        return text
    shared = shareable_results(data, model_dir.name)
    return json.dumps(shared, indent=2, ensure_ascii=False) + "\n"


def check_repo_id(repo_id: str) -> None:
    """A model repo id must name its owner: `org/name` (or `user/name`)."""
    if repo_id.count("/") != 1:
        raise HubError(f"repo id {repo_id!r}: expected ORG/NAME, e.g. my-org/my-merge")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"repo id {repo_id!r}: {_first_line(str(e))}") from None


def check_online() -> None:
    """Fail at once in offline mode, rather than after retrying a network that is switched off.

    huggingface_hub reads `HF_HUB_OFFLINE` at import into `constants.HF_HUB_OFFLINE`, which code
    may also set; either way publishing cannot work, so both are checked now.
    """
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in _TRUE:
        raise HubError("HF_HUB_OFFLINE is set: publishing needs the Hub (unset HF_HUB_OFFLINE)")


def resolve_token(token: str | None, *, oidc_repo: str | None = None) -> str:
    """`token`, else `HF_TOKEN`, else the stored login; an error naming the three if none.

    With `oidc_repo`, the token is the one the Hub's Trusted Publishers give for that repo in
    exchange for the CI job's OIDC identity: huggingface_hub (1.19 and later) makes the exchange
    when `HF_OIDC_RESOURCE` names the repo, minting the identity on GitHub Actions (the job needs
    `permissions: id-token: write`) or reading it from `HF_OIDC_ID_TOKEN` elsewhere.
    """
    if oidc_repo:
        if token:
            raise HubError("--token and --oidc exclude each other: --oidc gets its own token")
        return check_token_text(_oidc_token(oidc_repo))
    token = (token or get_token() or "").strip()
    if not token:
        raise HubError(
            "not logged in to the Hub: run `hf auth login`, set HF_TOKEN or pass --token"
        )
    return check_token_text(token)


def check_token_text(token: str) -> str:
    """Refuse a token with a line break, a space or another control character inside, without
    showing it: a token pasted with more than itself would be sent, and quoted back in the
    HTTP client's errors in forms a scrubber of the raw string misses.
    """
    if not token.isprintable() or any(c.isspace() for c in token):
        raise HubError(
            "the Hub token has a line break, space or other control character inside (pasted "
            "with something else?); it is not shown here: copy the token again"
        )
    return token


def scrub(text: str, secret: str | None) -> str:
    """`text` with every form of `secret` in it replaced by `***`: as is, stripped, escaped as
    Python or JSON would quote it, and URL-quoted (errors quote requests in each of these).
    """
    if not secret:
        return text
    forms = {
        secret,
        secret.strip(),
        repr(secret)[1:-1],
        repr(secret.encode())[2:-1],
        json.dumps(secret)[1:-1],
        quote(secret, safe=""),
    }
    for form in sorted((f for f in forms if len(f) >= 4), key=len, reverse=True):
        text = text.replace(form, "***")
    return text


def check_token(
    repo_id: str,
    token: str,
    *,
    endpoint: str | None = None,
    retry: RetryPolicy | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> str:
    """The Hub user `token` belongs to, asked of the Hub (`whoami`), for publishing `repo_id`.

    `hubmerge run` asks before it merges, so a refused token is found in seconds, not after
    hours of merging and evaluating; the refusal reads as a publish's would (`_HubCaller`).
    """
    api = _api(_endpoint(endpoint), token)
    answer = _HubCaller(repo_id, token, retry or RETRY, log)(lambda: api.whoami(token=token))
    return str(answer.get("name", ""))


def _endpoint(endpoint: str | None) -> str:
    """`endpoint`, else `HF_ENDPOINT` as set now (the client reads it only at import)."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _api(endpoint: str, token: str) -> HfApi:
    return HfApi(
        endpoint=endpoint, token=token, library_name="hubmerge", library_version=__version__
    )


def upload_files(model_dir: Path, *, card_only: bool = False) -> tuple[UploadFile, ...]:
    """The files `upload_folder` will send, chosen by the same patterns, with their sizes.

    A whole folder must hold weights: publishing one without them would delete the model's
    weights on the Hub (see `STALE_WEIGHT_PATTERNS`). A card alone needs its README.md.
    """
    if not model_dir.is_dir():
        raise HubError(f"{model_dir}: no such model folder")
    if not (model_dir / MODEL_CONFIG_FILE).is_file():
        raise HubError(f"{model_dir}: not a model folder (no config.json)")
    paths = {p.relative_to(model_dir).as_posix(): p for p in model_dir.rglob("*") if p.is_file()}
    chosen = list(
        filter_repo_objects(
            sorted(paths),
            allow_patterns=list(CARD_FILES) if card_only else None,
            ignore_patterns=DEFAULT_IGNORE_PATTERNS + LOCAL_ONLY_PATTERNS,
        )
    )
    if card_only and CARD_FILE not in chosen:
        raise HubError(f"{model_dir}: no {CARD_FILE} to publish (write it with `hubmerge card`)")
    if not card_only and not list(filter_repo_objects(chosen, allow_patterns=WEIGHT_PATTERNS)):
        raise HubError(
            f"{model_dir}: no weights (*.safetensors): publishing it would delete the model's "
            "weights on the Hub; publish the card alone with --card-only"
        )
    return tuple(UploadFile(name, paths[name].stat().st_size) for name in chosen)


def read_frontmatter(model_dir: Path) -> dict[str, Any] | None:
    """The model card's YAML metadata, checked here so a bad card fails before any upload."""
    readme = model_dir / CARD_FILE
    if not readme.is_file():
        return None
    try:
        return metadata_load(readme) or {}
    except (yaml.YAMLError, ValueError) as e:
        raise HubError(f"{readme}: invalid YAML metadata ({_first_line(str(e))})") from None


def _frontmatter(card: str, where: Path) -> dict[str, Any]:
    """The YAML metadata of card text (`read_frontmatter` for a card not on disk)."""
    try:
        return ModelCard(card).data.to_dict()
    except (yaml.YAMLError, ValueError) as e:
        raise HubError(f"{where}: invalid YAML metadata ({_first_line(str(e))})") from None


def _oidc_token(repo_id: str) -> str:
    """A short-lived token for `repo_id` from the Hub's Trusted Publishers (see `resolve_token`)."""
    try:
        from huggingface_hub.errors import OIDCError
    except ImportError:
        raise HubError(
            "--oidc needs huggingface_hub 1.19 or later: pip install -U huggingface_hub"
        ) from None
    try:
        with _environ("HF_OIDC_RESOURCE", repo_id):
            token = get_token()
    except OIDCError as e:
        raise HubError(f"{repo_id}: no OIDC identity to exchange: {_first_line(str(e))}") from None
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "no answer"
        raise HubError(
            f"{repo_id}: the Hub refused the OIDC token exchange ({status}): add this workflow "
            "as a Trusted Publisher in the repo's settings on the Hub, with claims matching "
            "the job (repository, workflow, branch)"
        ) from None
    except Exception as e:  # the network: one line, like every other Hub failure
        raise HubError(f"{repo_id}: the OIDC token exchange failed: {_short(e)}") from None
    if not token:
        raise HubError(f"{repo_id}: the Hub's OIDC token exchange gave no token")
    return token


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """Set an environment variable for the duration, then restore what was there."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


class _HubCaller:
    """Runs Hub calls for one repo: retries transient failures, turns the rest into one line."""

    def __init__(
        self, repo_id: str, token: str, retry: RetryPolicy, log: Callable[[str], None]
    ) -> None:
        self.repo_id, self.token, self.retry, self.log = repo_id, token, retry, log

    def __call__(self, request: Callable[[], T]) -> T:
        attempt = 1
        while True:
            try:
                return request()
            except Exception as e:
                # A 401 is its own kind, so the Space can say what to do on a web page.
                kind = TokenError if _status(e) == 401 else HubError
                if _client_retried(e):  # the client retried it already: no second layer
                    raise kind(self._scrub(self._describe(e, self.retry.tries))) from None
                if attempt >= self.retry.tries or not _is_transient(e):
                    raise kind(self._scrub(self._describe(e, attempt))) from None
                wait = min(self.retry.delay * 2 ** (attempt - 1), self.retry.max_delay)
                self.retrying(_what_failed(e), attempt, self.retry.tries, wait)
                time.sleep(wait)
                attempt += 1

    def retrying(self, what: str, attempt: int, tries: int, wait: float) -> None:
        """The one line each retry gets, whichever layer retries."""
        self.log(
            self._scrub(f"{self.repo_id}: {what} (try {attempt} of {tries}); ")
            + f"retrying in {wait:g}s"
        )

    def _describe(self, error: Exception, attempt: int) -> str:
        """One line saying what went wrong and what to do about it."""
        repo = self.repo_id
        cause = _cause(error)
        status = _status(error)
        server_message = _first_line(getattr(cause, "server_message", None) or "")
        said = f" (Hub: {server_message})" if server_message else ""
        if status == 401:
            return (
                f"{repo}: the Hub refused the token (401: not logged in, or the token is invalid "
                "or expired): run `hf auth login`, set HF_TOKEN or pass --token"
            )
        if status == 403:
            return (
                f"{repo}: no write access (403): use a token with write permission for "
                f"{repo.split('/')[0]} (fine-grained tokens need it granted per repo or org)"
            )
        if isinstance(cause, RevisionNotFoundError):
            return f"{repo}: branch not found (404){said}"
        if status == 404:
            return (
                f"{repo}: repository not found (404): check the id, and that the namespace is "
                "your user name or an organization you can write to"
            )
        if status == 409:
            return (
                f"{repo}: conflict (409){said}: the repo or branch changed during the upload; "
                "run the command again"
            )
        if _is_transient(error):
            return (
                f"{repo}: the Hub kept failing ({_what_failed(error)}, {attempt} tries): "
                "try again later; "
                "running the command again resumes the upload"
            )
        if status is not None:
            return f"{repo}: the Hub refused the upload ({status}){said}"
        return f"{repo}: upload failed: {_short(error)}"

    def _scrub(self, text: str) -> str:
        return scrub(text, self.token)


#: Requests huggingface_hub retries itself (`http_backoff`, `RetryPolicy`'s default policy):
#: the upload's preupload calls.
_CLIENT_RETRIED = re.compile(r"/preupload/")
#: What huggingface_hub logs while it retries, and after a commit it skipped.
_CLIENT_FAILED = re.compile(r"^(?:HTTP Error (\d+)|'(.*)') thrown while requesting ")
_CLIENT_RETRY = re.compile(r"^Retrying in ([\d.]+)s \[Retry (\d+)/(\d+)\]")
_CLIENT_UNCHANGED = "No files have been modified since last commit"


def _client_retried(error: Exception) -> bool:
    """Whether `error` answers a request huggingface_hub has retried already."""
    response = error.response if isinstance(error, HfHubHTTPError) else None
    return response is not None and bool(_CLIENT_RETRIED.search(str(response.url)))


class _ClientLog(logging.Filter):
    """huggingface_hub's own messages during a publish, in hubmerge's words.

    Its two lines per retry ("HTTP Error 500 thrown while requesting ...", "Retrying in 1s
    [Retry 1/5].") become the caller's one retry line, and its "No files have been modified
    since last commit" goes, since the result says `unchanged` itself.
    """

    def __init__(self, call: _HubCaller) -> None:
        super().__init__()
        self.call, self.failed = call, "an error"

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(_CLIENT_UNCHANGED):
            return False
        if failed := _CLIENT_FAILED.match(message):
            status, error = failed.groups()
            self.failed = f"HTTP {status}" if status else _first_line(error or "")
            return False
        if retry := _CLIENT_RETRY.match(message):
            wait, attempt, retries = float(retry[1]), int(retry[2]), int(retry[3])
            self.call.retrying(self.failed, attempt, retries + 1, wait)
            return False
        return True


#: The loggers of huggingface_hub that speak during an upload.
_CLIENT_LOGGERS = ("huggingface_hub.utils._http", "huggingface_hub.hf_api")


@contextlib.contextmanager
def _client_log(call: _HubCaller) -> Iterator[None]:
    """Route huggingface_hub's messages through `_ClientLog` for the duration."""
    client_log = _ClientLog(call)
    loggers = [logging.getLogger(name) for name in _CLIENT_LOGGERS]
    for logger in loggers:
        logger.addFilter(client_log)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(client_log)


def _cause(error: Exception) -> Exception:
    """The Hub's answer behind `error`: the client wraps a rejected README metadata check in a
    ValueError."""
    return error.__cause__ if isinstance(error.__cause__, HfHubHTTPError) else error


def _status(error: Exception) -> int | None:
    """The HTTP status the Hub answered with, if it answered."""
    cause = _cause(error)
    if isinstance(cause, HfHubHTTPError) and cause.response is not None:
        return int(cause.response.status_code)
    return None


def _is_transient(error: Exception) -> bool:
    if isinstance(error, HfHubHTTPError):
        return error.response is not None and error.response.status_code in TRANSIENT_STATUSES
    if isinstance(error, OfflineModeIsEnabled):
        return False
    return any(cls.__name__ in _TRANSPORT_ERRORS for cls in type(error).__mro__)


def _what_failed(error: Exception) -> str:
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return f"HTTP {error.response.status_code}"
    return _short(error)


def _short(error: Exception) -> str:
    return f"{type(error).__name__}: {_first_line(str(error))}"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
