"""A Hugging Face Hub on loopback for the download tests (no network here): the few routes huggingface_hub uses.

- ``GET /api/models/OWNER/NAME[/revision/REV]``: the repository's commit and files (``model_info``);
  ``GET /api/models/OWNER/NAME/tree/REV``: its file list (``snapshot_download``).
- ``HEAD|GET /OWNER/NAME/resolve/REV/FILE``: one file, with the commit, ETag and size headers
  ``hf_hub_download`` reads.
- A missing repository or file answers 404 with the ``X-Error-Code`` huggingface_hub turns into its errors.

``repos`` maps ``owner/name`` to ``{file name: local path}``; ``requests`` records every (method, path) served.
"""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, repos: dict[str, dict[str, Path]]):
        self.repos = repos
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _fail(self, code: str):
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _json(self, data: bytes, body: bool):
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _serve(self, body: bool):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo = "/".join(parts[2:4])
                    if repo not in hub.repos:
                        return self._fail("RepoNotFound")
                    if len(parts) >= 6 and parts[4] == "tree":  # list_repo_tree (snapshot_download)
                        data = json.dumps([{"type": "file", "path": f, "size": p.stat().st_size,
                                            "oid": hashlib.sha1(f.encode()).hexdigest()}
                                           for f, p in hub.repos[repo].items()]).encode()
                        return self._json(data, body)
                    data = json.dumps({"id": repo, "modelId": repo, "sha": hub.sha(repo), "private": False,
                                       "gated": False, "disabled": False, "tags": [],
                                       "siblings": [{"rfilename": f, "size": p.stat().st_size}
                                                    for f, p in hub.repos[repo].items()]}).encode()
                    return self._json(data, body)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                    if repo not in hub.repos:
                        return self._fail("RepoNotFound")
                    f = hub.repos[repo].get(name)
                    if f is None:
                        return self._fail("EntryNotFound")
                    size = f.stat().st_size
                    self.send_response(200)
                    self.send_header("X-Repo-Commit", hub.sha(repo))
                    self.send_header("ETag", f'"{hashlib.sha1(f"{repo}/{name}/{size}".encode()).hexdigest()}"')
                    self.send_header("Content-Length", str(size))
                    self.end_headers()
                    if body:
                        with open(f, "rb") as fh:
                            while chunk := fh.read(1 << 20):
                                self.wfile.write(chunk)
                    return
                self._fail("RepoNotFound")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def sha(self, repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def served(self, suffix: str) -> list[str]:
        """Paths of the files served with a body (GET) whose name ends with ``suffix``."""
        return [p for m, p in self.requests if m == "GET" and "/resolve/" in p and p.endswith(suffix)]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
