"""A loopback stand-in for the Hugging Face Hub: exactly the endpoints huggingface_hub 2.x calls for
``HfApi.create_repo`` and ``HfApi.upload_folder`` (the Hub itself cannot be reached here).

* ``POST /api/repos/create``: JSON ``{name, organization, visibility, type}``; 409 when it exists.
* ``POST /api/validate-yaml``: the README's metadata, checked before anything uploads (here: the
  front matter must be a YAML mapping; the real Hub checks its schema too).
* ``POST /api/models/{repo}/preupload/{revision}``: which upload mode each file takes. The stand-in
  answers ``regular`` for every file (the content then travels base64-encoded inside the commit);
  the real Hub sends large and binary files through its Xet storage instead, whose protocol is not
  part of this stand-in. ``oid`` is the git blob id of a file already there (unchanged files are
  then skipped by the client, as with the real Hub).
* ``POST /api/models/{repo}/commit/{revision}``: the NDJSON commit (a header, then one line a file).

Every POST must carry a bearer token; anything else is answered 404 and recorded in ``unexpected``
so a test can insist that nothing else was called (except the client's best-effort
``GET /api/agent-harnesses`` telemetry, which it makes with any call and which copes with a 404).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    visibility: str | None
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)


class HubStandIn:
    """Start with ``with HubStandIn() as hub:``; ``hub.endpoint`` is what HF_ENDPOINT should say."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        self.tokens: set[str] = set()
        self.validated: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _reply(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                path = self.path.split("?", 1)[0]
                stand_in.requests.append(("POST", path))
                auth = self.headers.get("Authorization", "")
                if not auth.startswith("Bearer "):
                    self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return
                stand_in.tokens.add(auth[len("Bearer ") :])
                if path == "/api/repos/create":
                    self._create(json.loads(body))
                    return
                if path == "/api/validate-yaml":
                    self._validate_yaml(json.loads(body))
                    return
                parts = path.split("/")
                # /api/models/{owner}/{name}/{preupload|commit}/{revision}
                if (
                    len(parts) == 7
                    and parts[1:3] == ["api", "models"]
                    and parts[5] in ("preupload", "commit")
                ):
                    repo_id = f"{parts[3]}/{parts[4]}"
                    repo = stand_in.repos.get(repo_id)
                    if repo is None:
                        self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                        return
                    if parts[5] == "preupload":
                        self._preupload(repo, json.loads(body))
                    else:
                        self._commit(repo_id, repo, body)
                    return
                stand_in.unexpected.append(("POST", path))
                self._reply(404, {"error": "not part of the stand-in"})

            def do_GET(self) -> None:  # noqa: N802
                stand_in.requests.append(("GET", self.path))
                # The client's best-effort telemetry (which coding agent runs it): it copes with a 404.
                if self.path.split("?", 1)[0] != "/api/agent-harnesses":
                    stand_in.unexpected.append(("GET", self.path))
                self._reply(404, {"error": "not part of the stand-in"})

            do_HEAD = do_GET  # noqa: N815
            do_PUT = do_GET  # noqa: N815

            def _create(self, payload: dict[str, Any]) -> None:
                repo_id = (
                    f"{payload['organization']}/{payload['name']}"
                    if payload.get("organization")
                    else payload["name"]
                )
                if payload.get("type", "model") != "model":
                    self._reply(400, {"error": "the stand-in holds model repositories only"})
                    return
                if repo_id in stand_in.repos:
                    self._reply(
                        409,
                        {
                            "error": "You already created this model repo",
                            "url": f"{stand_in.endpoint}/{repo_id}",
                        },
                    )
                    return
                stand_in.repos[repo_id] = Repo(visibility=payload.get("visibility"))
                self._reply(200, {"url": f"{stand_in.endpoint}/{repo_id}", "name": repo_id})

            def _validate_yaml(self, payload: dict[str, Any]) -> None:
                import yaml

                content = payload.get("content", "")
                stand_in.validated.append(content)
                meta = yaml.safe_load(content.split("---\n", 2)[1]) if content.startswith("---\n") else None
                if not isinstance(meta, dict):
                    self._reply(
                        400, {"errors": [{"message": "the README has no YAML metadata"}], "warnings": []}
                    )
                    return
                self._reply(200, {"errors": [], "warnings": []})

            def _preupload(self, repo: Repo, payload: dict[str, Any]) -> None:
                files = []
                for f in payload["files"]:
                    have = repo.files.get(f["path"])
                    files.append(
                        {
                            "path": f["path"],
                            "uploadMode": "regular",
                            "shouldIgnore": False,
                            "oid": git_blob_id(have) if have is not None else None,
                        }
                    )
                self._reply(200, {"files": files, "commitOid": repo.commits[-1] if repo.commits else None})

            def _commit(self, repo_id: str, repo: Repo, body: bytes) -> None:
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                if not lines or lines[0].get("key") != "header":
                    self._reply(400, {"error": "a commit starts with its header"})
                    return
                for item in lines[1:]:
                    value = item["value"]
                    if item["key"] == "file" and value.get("encoding") == "base64":
                        repo.files[value["path"]] = base64.b64decode(value["content"])
                    elif item["key"] == "deletedFile":
                        repo.files.pop(value["path"], None)
                    else:
                        self._reply(400, {"error": f"the stand-in does not take {item['key']!r} operations"})
                        return
                oid = hashlib.sha1(body).hexdigest()
                repo.commits.append(oid)
                self._reply(
                    200, {"commitUrl": f"{stand_in.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid}
                )

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
