"""A small Hub-compatible HTTP server for tests: the real `huggingface_hub` client talks to it.

Start it on 127.0.0.1, point HF_ENDPOINT at `server.url` in a fresh process (huggingface_hub reads
HF_ENDPOINT at import), and push / download with the ordinary client calls. It implements only the
endpoints those calls really use, the way the Hub answers them:

  POST /api/repos/create                               create_repo (409 if it exists)
  POST /api/validate-yaml                              README.md metadata check made before a commit
  POST /api/{type}s/{repo_id}/preupload/{revision}     upload modes: everything "regular" (inline)
  POST /api/{type}s/{repo_id}/commit/{revision}        NDJSON commit: header + base64 files
  GET  /api/{type}s/{repo_id}[/revision/{revision}]    repo info with the file list
  GET  /api/{type}s/{repo_id}/tree/{revision}[/{path}] list_repo_tree (transformers looks for chat templates)
  HEAD/GET /{repo_id}/resolve/{revision}/{path}        file metadata (ETag, X-Repo-Commit) and bytes

Like the Hub it rejects a model card whose `base_model` is not a model id (transformers#33922) and
hides a private repo from requests without the creator's token. `HubServer(reject_tokens={token: status})` answers
every request made with one of those tokens with that status (401: a token the Hub does not know, 403: one
without write access, 5xx: the Hub failing). What it receives is kept in
`server.repos` (repo_id -> Repo) and every request in `server.requests`, so tests can check both.
Nothing here is a mock of the toolkit: the toolkit only ever sees a Hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# The Hub's rule for a model id as used in card metadata: "name" or "namespace/name".
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.\-]*/)?[A-Za-z0-9][\w.\-]*$")


@dataclass
class Repo:
    repo_id: str
    repo_type: str = "model"
    private: bool = False
    owner_auth: str | None = None  # the Authorization header that created it
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)

    @property
    def head(self) -> str:
        return self.commits[-1]["oid"] if self.commits else "0" * 40


def _card_base_model_error(readme: bytes) -> str | None:
    """The Hub's check on README.md metadata: every base_model entry must be a model id."""
    import yaml

    text = readme.decode("utf-8", errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return None
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as err:
        return f"Invalid YAML in README.md metadata: {err}"
    base = meta.get("base_model") if isinstance(meta, dict) else None
    for value in base if isinstance(base, list) else ([base] if base is not None else []):
        if not isinstance(value, str) or not _REPO_ID.match(value) or ".." in value:
            return f'"base_model" with value "{value}" is not valid. Use a model id from https://hf.co/models.'
    return None


class _Handler(BaseHTTPRequestHandler):
    server: "HubServer._HTTPServer"
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean; requests are recorded instead
        pass

    # ----------------------------------------------------------------- helpers
    def _send(self, status: int, body: bytes | dict | None = None, headers: dict | None = None, head: bool = False):
        if isinstance(body, dict) or isinstance(body, list):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        body = body or b""
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, status: int, message: str, head: bool = False, code: str | None = None):
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers=headers, head=head)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _record(self, body: bytes = b""):
        self.server.hub.requests.append(
            {"method": self.command, "path": self.path, "authorization": self.headers.get("Authorization"),
             "body": body}
        )

    def _rejected(self, head: bool = False) -> bool:
        """Answer a request made with one of `reject_tokens` with its status, as the Hub answers such a token."""
        auth = self.headers.get("Authorization") or ""
        status = self.server.hub.reject_tokens.get(auth.removeprefix("Bearer "))
        if status is None:
            return False
        messages = {401: "Invalid credentials in Authorization header",
                    403: "You don't have the rights to create a model under this namespace"}
        self._error(status, messages.get(status, "Internal Error"), head=head)
        return True

    def _visible_repo(self, repo_id: str) -> Repo | None:
        repo = self.server.hub.repos.get(repo_id)
        if repo is None:
            return None
        if repo.private and self.headers.get("Authorization") != repo.owner_auth:
            return None  # the Hub answers 404 (not 403) for private repos you cannot see
        return repo

    # ----------------------------------------------------------------- routes
    def do_POST(self):
        body = self._body()
        self._record(body)
        if self._rejected():
            return None
        path = unquote(urlsplit(self.path).path)
        hub = self.server.hub
        if path == "/api/repos/create":
            payload = json.loads(body or b"{}")
            name, org = payload.get("name"), payload.get("organization")
            repo_id = f"{org}/{name}" if org else name
            # huggingface_hub 1.x sends "visibility"; older clients sent "private".
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            answer = {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id}
            with hub.lock:
                # the Hub's 409 still carries the repo url (create_repo(exist_ok=True) reads it)
                if repo_id in hub.repos:
                    message = "You already created this model repo"
                    return self._send(409, {**answer, "error": message}, headers={"X-Error-Message": message})
                hub.repos[repo_id] = Repo(repo_id, payload.get("type") or "model", private,
                                          self.headers.get("Authorization"))
            return self._send(200, answer)
        if path == "/api/validate-yaml":  # the client checks README.md metadata before committing it
            problem = _card_base_model_error(json.loads(body or b"{}").get("content", "").encode())
            if problem:
                return self._send(400, {"errors": [{"message": problem}]}, headers={"X-Error-Message": problem})
            return self._send(200, {"errors": [], "warnings": []})
        match = re.match(r"^/api/(model|dataset|space)s/(.+)/(preupload|commit)/([^/]+)$", path)
        if match:
            _, repo_id, action, _revision = match.groups()
            repo = self._visible_repo(repo_id)
            if repo is None:
                return self._error(404, "Repository not found", code="RepoNotFound")
            if action == "preupload":
                files = json.loads(body or b"{}").get("files", [])
                return self._send(
                    200,
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                               for f in files]},
                )
            return self._commit(repo, body)
        return self._error(404, f"no route for POST {path}")

    def _commit(self, repo: Repo, body: bytes):
        header, added, deleted = {}, {}, []
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                header = value
            elif key == "file":
                data = value.get("content", "")
                added[value["path"]] = base64.b64decode(data) if value.get("encoding") == "base64" else data.encode()
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            elif key == "lfsFile":  # never requested: preupload answers "regular" for every file
                return self._error(400, "LFS uploads are not supported by this test server")
        if "README.md" in added:
            problem = _card_base_model_error(added["README.md"])
            if problem:
                return self._error(400, problem, code="BadRequest")
        oid = hashlib.sha1(body).hexdigest()
        with self.server.hub.lock:
            for path in deleted:
                repo.files = {k: v for k, v in repo.files.items()
                              if k != path and not k.startswith(path.rstrip("/") + "/")}
            repo.files.update(added)
            repo.commits.append({"oid": oid, "summary": header.get("summary", ""), "files": sorted(added)})
        hub_url = self.server.hub.url
        return self._send(200, {"commitUrl": f"{hub_url}/{repo.repo_id}/commit/{oid}", "commitOid": oid,
                                "pullRequestUrl": None})

    def do_GET(self):
        self._serve_get(head=False)

    def do_HEAD(self):
        self._serve_get(head=True)

    def _serve_get(self, head: bool):
        self._record()
        if self._rejected(head):
            return None
        path = unquote(urlsplit(self.path).path)
        match = re.match(r"^/api/(?:model|dataset|space)s/([^/]+(?:/[^/]+)?)/tree/([^/]+)(?:/(.*))?$", path)
        if match:
            repo = self._visible_repo(match.group(1))
            if repo is None:
                return self._error(404, "Repository not found", head=head, code="RepoNotFound")
            return self._tree(repo, (match.group(3) or "").strip("/"), head)
        match = re.match(r"^/api/(model|dataset|space)s/(.+?)(?:/revision/([^/]+))?$", path)
        if match:
            repo = self._visible_repo(match.group(2))
            if repo is None:
                return self._error(404, "Repository not found", head=head, code="RepoNotFound")
            siblings = [{"rfilename": name, "size": len(data)} for name, data in sorted(repo.files.items())]
            info = {"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.head, "private": repo.private,
                    "siblings": siblings}
            return self._send(200, info, head=head)
        match = re.match(r"^/(?:(datasets|spaces)/)?(.+)/resolve/([^/]+)/(.+)$", path)
        if match:
            repo = self._visible_repo(match.group(2))
            if repo is None:
                return self._error(404, "Repository not found", head=head, code="RepoNotFound")
            data = repo.files.get(match.group(4))
            if data is None:
                return self._error(404, "Entry not found", head=head, code="EntryNotFound")
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id, as the Hub's ETag
            headers = {"ETag": f'"{etag}"', "X-Repo-Commit": repo.head, "Content-Type": "application/octet-stream"}
            return self._send(200, data, headers=headers, head=head)
        return self._error(404, f"no route for GET {path}", head=head)


    def _tree(self, repo: Repo, folder: str, head: bool):
        """list_repo_tree, not recursive: the files and folders directly in `folder`; a folder with nothing in it
        does not exist, and the Hub answers 404 EntryNotFound (transformers looks for additional_chat_templates/)."""
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict] = {}
        for name, data in sorted(repo.files.items()):
            if not name.startswith(prefix):
                continue
            child, _, rest = name[len(prefix):].partition("/")
            path = prefix + child
            entries[path] = ({"type": "directory", "oid": "", "path": path} if rest else
                             {"type": "file", "oid": hashlib.sha1(data).hexdigest(), "size": len(data), "path": path})
        if folder and not entries:
            return self._error(404, "Entry not found", head=head, code="EntryNotFound")
        return self._send(200, list(entries.values()), head=head)


class HubServer:
    """`with HubServer() as hub:` serves on 127.0.0.1 at a free port until the block ends."""

    class _HTTPServer(ThreadingHTTPServer):
        daemon_threads = True
        hub: "HubServer"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, reject_tokens: dict[str, int] | None = None):
        self.reject_tokens = dict(reject_tokens or {})
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self._httpd = self._HTTPServer((host, port), _Handler)
        self._httpd.hub = self
        self.url = f"http://{host}:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-server", daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)
