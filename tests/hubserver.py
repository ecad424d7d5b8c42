"""A small Hub-compatible HTTP server, so publishing is tested with the real huggingface_hub client.

It implements what `whoami`, `create_repo`, `create_branch`, `repo_info`, `list_repo_files`
and `upload_folder` (without Xet) call, and keeps what it receives in memory: repos, their branches
and pull requests, and every file's bytes. Every file is answered `uploadMode: regular` at
preupload, so contents arrive base64 in the NDJSON commit and no LFS or Xet storage is needed.
`fail()` makes the next requests to a path answer an error, to test retries and error messages.
Public repos can be read without a token, as on the Hub; it serves no file downloads, so tests
that download put the files in a Hub cache (a download pins the ref's latest commit id).
`trusted_publishers` set up the Trusted Publishers token exchange, with a stand-in for GitHub
Actions' id-token endpoint, so OIDC publishing runs the client's own exchange code.
A request it does not know is recorded in `unknown` and answered 501, so a new client version's
extra call shows up clearly.

Helpers for tests that publish come last.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from click.testing import Result

#: The one token the server accepts; tests check that it never shows up in output or files.
TOKEN = "hf_TestSecretToken0123456789abcdef"

_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"
_REV = r"(?P<rev>[^/]+)"
#: (method, path pattern, handler name): the endpoints the upload path of huggingface_hub uses.
ROUTES = [
    ("POST", r"/api/repos/create", "create_repo"),
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{_REPO}", "repo_info"),
    ("GET", rf"/api/models/{_REPO}/revision/{_REV}", "repo_info"),
    ("GET", rf"/api/models/{_REPO}/tree/{_REV}", "tree"),
    ("POST", rf"/api/models/{_REPO}/branch/{_REV}", "create_branch"),
    ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/{_REV}", "commit"),
    ("POST", r"/oauth/token", "oauth_token"),
    ("GET", r"/_github/oidc", "github_oidc"),
]
#: The bearer token GitHub's id-token endpoint (stood in for by `github_oidc`) wants: what
#: GitHub Actions puts in `ACTIONS_ID_TOKEN_REQUEST_TOKEN`.
GITHUB_REQUEST_TOKEN = "github-request-token"
#: Routes whose bearer is not the Hub token: the Trusted Publishers exchange takes none (the id
#: token is in the body), and GitHub's id-token endpoint takes its own.
_BEARERS = {"/oauth/token": None, "/_github/oidc": GITHUB_REQUEST_TOKEN}
#: The X-Error-Code the Hub sends with an error status, which huggingface_hub maps to its errors.
_ERROR_CODES = {404: "RepoNotFound"}


def git_blob_oid(data: bytes) -> str:
    """The git object id of a file, which the Hub returns at preupload for unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    #: branch or PR ref (`refs/pr/1`) -> file path -> bytes
    refs: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def files(self) -> dict[str, bytes]:
        return self.refs["main"]


class _Reply(Exception):
    """Ends a handler with an HTTP error answer."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


@dataclass(frozen=True)
class _Request:
    """One request, with the repo id and revision its path names (unquoted)."""

    body: bytes
    query: dict[str, str]
    repo: str = ""
    rev: str = "main"

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass
class _Failure:
    pattern: str
    status: int
    times: int
    message: str


class HubServer:
    """The fake Hub: start it with `with HubServer(token) as hub:`, point clients at `hub.url`."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        #: repo id -> the OIDC id token its Trusted Publisher accepts (exchanged for `token`)
        self.trusted_publishers: dict[str, str] = {}
        #: (method, path) of every request, in order, failures included
        self.requests: list[tuple[str, str]] = []
        #: (method, path) of requests no route matched
        self.unknown: list[tuple[str, str]] = []
        self._failures: list[_Failure] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def fail(self, pattern: str, status: int, *, times: int = 1, message: str = "") -> None:
        """Answer `status` to the next `times` requests whose path matches regex `pattern`."""
        with self._lock:
            self._failures.append(_Failure(pattern, status, times, message or f"error {status}"))

    def paths(self, method: str | None = None) -> list[str]:
        """Paths of the requests received so far (only `method`'s, if given)."""
        return [p for m, p in self.requests if method in (None, m)]

    # -- one method per route: each takes the request and returns the JSON answer -------------

    def whoami(self, request: _Request) -> dict[str, Any]:
        """Who the token belongs to (reached only with the token: a wrong one is 401)."""
        return {"type": "user", "name": "tester", "auth": {"type": "access_token"}}

    def create_repo(self, request: _Request) -> dict[str, Any]:
        body = request.json()
        if not body.get("organization"):
            raise _Reply(400, "this test server needs a namespace: org/name")
        if body.get("type", "model") != "model":
            raise _Reply(400, "this test server only has model repos")
        repo_id = f"{body['organization']}/{body['name']}"
        if repo_id in self.repos:
            # The Hub names the existing repo, and create_repo(exist_ok=True) reads it.
            raise _Reply(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        self.repos[repo_id] = Repo(private=body.get("visibility") == "private")
        return {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def validate_yaml(self, request: _Request) -> dict[str, Any]:
        match = re.match(r"---\n(.*?)\n---\n", request.json()["content"], re.DOTALL)
        if match:
            try:
                metadata = yaml.safe_load(match.group(1))
            except yaml.YAMLError as e:
                raise _Reply(400, f"invalid YAML metadata: {e}") from None
            if not isinstance(metadata, dict):
                raise _Reply(400, "metadata must be a mapping")
        return {"errors": [], "warnings": []}

    def repo_info(self, request: _Request) -> dict[str, Any]:
        files = self._ref(request.repo, request.rev)
        repo = self.repos[request.repo]
        return {
            "id": request.repo,
            "private": repo.private,
            "sha": repo.commits[-1]["oid"] if repo.commits else "0" * 40,
            "siblings": [{"rfilename": name} for name in sorted(files)],
        }

    def tree(self, request: _Request) -> list[dict[str, Any]]:
        """Every file of a revision, as one page (the client asks recursively to delete files)."""
        files = self._ref(request.repo, request.rev)
        return [
            {"type": "file", "path": name, "size": len(data), "oid": git_blob_oid(data)}
            for name, data in sorted(files.items())
        ]

    def create_branch(self, request: _Request) -> dict[str, Any]:
        refs = self._repo(request.repo).refs
        if request.rev in refs:
            raise _Reply(409, f"Reference {request.rev} already exists")
        refs[request.rev] = dict(refs[request.json().get("startingPoint") or "main"])
        return {}

    def preupload(self, request: _Request) -> dict[str, Any]:
        # A pull request starts from main, whatever revision the client names.
        rev = "main" if request.query.get("create_pr") else request.rev
        files = self._ref(request.repo, rev)
        return {
            "files": [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_oid(files[f["path"]]) if f["path"] in files else None,
                }
                for f in request.json()["files"]
            ]
        }

    def commit(self, request: _Request) -> dict[str, Any]:
        repo = self._repo(request.repo)
        rev = request.rev
        if request.query.get("create_pr"):
            rev = f"refs/pr/{sum(r.startswith('refs/pr/') for r in repo.refs) + 1}"
            repo.refs[rev] = dict(repo.refs["main"])
        files = self._ref(request.repo, rev)
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise _Reply(400, "the first line must be the commit header")
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                for name in [n for n in files if n.startswith(value["path"].rstrip("/") + "/")]:
                    del files[name]
            else:  # lfsFile never comes: preupload never answers uploadMode lfs
                raise _Reply(400, f"unsupported commit operation {key}")
        oid = hashlib.sha1(request.body).hexdigest()
        repo.commits.append({"oid": oid, "ref": rev, "summary": lines[0]["value"]["summary"]})
        url = f"{self.url}/{request.repo}"
        pr = f"{url}/discussions/{rev.rsplit('/', 1)[1]}" if rev.startswith("refs/pr/") else None
        return {"commitUrl": f"{url}/commit/{oid}", "commitOid": oid, "pullRequestUrl": pr}

    def oauth_token(self, request: _Request) -> dict[str, Any]:
        """The Trusted Publishers exchange (RFC 8693): an accepted id token buys the Hub token."""
        body = request.json()
        if self.trusted_publishers.get(body.get("resource")) != body.get("subject_token"):
            raise _Reply(400, "invalid_grant: no trusted publisher matches this id token")
        return {"access_token": self.token, "token_type": "bearer", "expires_in": 3600}

    def github_oidc(self, request: _Request) -> dict[str, Any]:
        """GitHub Actions' id-token endpoint: an id token naming the audience it was asked for."""
        return {"value": github_id_token(request.query.get("audience", ""))}

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise _Reply(404, "Repository not found", "RepoNotFound")
        return self.repos[repo_id]

    def _ref(self, repo_id: str, rev: str) -> dict[str, bytes]:
        repo = self._repo(repo_id)
        refs = repo.refs
        # A commit id (which downloads pin) names its ref's files while it is the ref's latest
        # commit: the server keeps no older states.
        latest = {c["ref"]: c["oid"] for c in repo.commits}
        rev = next((ref for ref, oid in latest.items() if oid == rev), rev)
        if rev not in refs:
            raise _Reply(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return refs[rev]

    # -- dispatch ------------------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: Any, body: bytes) -> tuple[int, Any, dict]:
        """Answer one request: (status, JSON body, extra headers)."""
        url = urlsplit(target)
        with self._lock:
            self.requests.append((method, url.path))
            try:
                self._fail_if_asked(url.path)
                auth = headers.get("Authorization")
                bearer = _BEARERS.get(url.path, self.token)
                if (
                    bearer
                    and auth != f"Bearer {bearer}"
                    and not (auth is None and self._public_read(method, url.path))
                ):
                    raise _Reply(401, "Invalid credentials in Authorization header")
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                return 200, self._dispatch(method, url.path, query, body), {}
            except _Reply as reply:
                extra = {"X-Error-Message": reply.message}
                code = reply.code or _ERROR_CODES.get(reply.status)
                if code:
                    extra["X-Error-Code"] = code
                return reply.status, {"error": reply.message, **reply.extra}, extra

    def _dispatch(self, method: str, path: str, query: dict[str, str], body: bytes) -> Any:
        for route_method, pattern, name in ROUTES:
            match = re.fullmatch(pattern, path)
            if match and method == route_method:
                args = {k: unquote(v) for k, v in match.groupdict().items()}
                return getattr(self, name)(_Request(body=body, query=query, **args))
        self.unknown.append((method, path))
        raise _Reply(501, f"the test Hub does not implement {method} {path}")

    def _public_read(self, method: str, path: str) -> bool:
        """Like the Hub, anyone may read a public repo without a token (a wrong token is 401)."""
        match = re.match(rf"/api/models/{_REPO}(/|$)", path)
        repo = self.repos.get(match["repo"]) if match else None
        return method == "GET" and repo is not None and not repo.private

    def _fail_if_asked(self, path: str) -> None:
        for failure in self._failures:
            if failure.times > 0 and re.search(failure.pattern, path):
                failure.times -= 1
                raise _Reply(failure.status, failure.message)


def _handler_class(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, payload, extra = hub.handle(self.command, self.path, self.headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the requests are in hub.requests; stderr noise would only hide test output

    return Handler


def github_id_token(audience: str) -> str:
    """The id token `github_oidc` mints for `audience` (the Hub's URL, when asked rightly)."""
    return f"github-id-token-for:{audience}"


def published_files(folder: Path) -> dict[str, bytes]:
    """What the Hub should hold after `folder` is published: every file but local state, with
    each local donor's absolute path (as the recipe and reports name it) cut to its folder name."""
    sources = folder / "hubmerge_sources.json"
    local = (
        [r for r in json.loads(sources.read_text()) if r.startswith("/")]
        if sources.exists()
        else []
    )
    files = {}
    for p in folder.rglob("*"):
        if p.is_file() and not p.name.startswith(".hubmerge"):
            data = p.read_bytes()
            for ref in sorted(local, key=len, reverse=True):
                data = data.replace(ref.encode(), Path(ref).name.encode())
            files[p.relative_to(folder).as_posix()] = data
    return files


def error_line(result: Result) -> str:
    """The CLI's one `error:` line, checked to be its last (after progress or retry notices)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], lines
    assert TOKEN not in result.output
    return lines[-1]
