"""A local stand-in of the Hugging Face Hub's read API for one dataset repo: what `datasets.load_dataset(repo_id)`
asks (the repo's info, its file tree, paths-info, each file by HEAD and GET, byte ranges), served on the loopback
address from a dict of files. Point HF_ENDPOINT at `url` in the process that loads."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

SHA = "0123456789abcdef0123456789abcdef01234567"


class HubStandIn:
    def __init__(self, repo_id: str, files: dict[str, bytes]):
        self.repo_id, self.files, self.requests = repo_id, files, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _entry(self, path: str) -> dict:
        if path in self.files:
            return {"type": "file", "path": path, "size": len(self.files[path]),
                    "oid": hashlib.sha1(self.files[path]).hexdigest()}
        return {"type": "directory", "path": path, "oid": "0" * 40, "size": 0}

    def _tree(self, prefix: str, recursive: bool) -> list[dict]:
        entries = {}
        for name in sorted(self.files):
            if prefix and not name.startswith(prefix + "/"):
                continue
            rest = name[len(prefix) + 1:] if prefix else name
            if "/" in rest and not recursive:
                folder = f"{prefix}/{rest.split('/')[0]}" if prefix else rest.split("/")[0]
                entries[folder] = self._entry(folder)
            else:
                entries[name] = self._entry(name)
        return list(entries.values())

    def _handler(self):
        hub, repo = self, re.escape(self.repo_id)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str]):
                self.send_response(code)
                for key, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, obj, code=200):
                self._send(code, json.dumps(obj).encode(), {"Content-Type": "application/json"})

            def _route(self):
                url = urlparse(self.path)
                path = unquote(url.path)
                hub.requests.append((self.command, path))
                if re.fullmatch(rf"/api/datasets/{repo}(?:/revision/[^/]+)?", path):
                    return self._json({"id": hub.repo_id, "sha": SHA, "private": True, "tags": [], "cardData": {},
                                       "lastModified": "2026-12-07T00:00:00.000Z",
                                       "siblings": [{"rfilename": name} for name in sorted(hub.files)]})
                tree = re.fullmatch(rf"/api/datasets/{repo}/tree/[^/]+/?(.*)", path)
                if tree:
                    recursive = parse_qs(url.query).get("recursive", ["false"])[0].lower() == "true"
                    return self._json(hub._tree(tree.group(1).strip("/"), recursive))
                if re.fullmatch(rf"/api/datasets/{repo}/paths-info/[^/]+", path):
                    raw = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                    wanted = (json.loads(raw) if raw.startswith("{") else parse_qs(raw)).get("paths", [])
                    return self._json([hub._entry(p) for p in wanted
                                       if p in hub.files or any(f.startswith(p + "/") for f in hub.files)])
                resolve = re.fullmatch(rf"/datasets/{repo}/resolve/[^/]+/(.+)", path)
                if resolve and resolve.group(1) in hub.files:
                    body = whole = hub.files[resolve.group(1)]
                    headers = {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(whole).hexdigest()}"',
                               "Accept-Ranges": "bytes"}
                    wanted = self.headers.get("Range")
                    if wanted:
                        first, last = wanted.split("=")[1].split("-")
                        first, last = int(first), int(last) if last else len(whole) - 1
                        body = whole[first:last + 1]
                        headers["Content-Range"] = f"bytes {first}-{first + len(body) - 1}/{len(whole)}"
                    return self._send(206 if wanted else 200, body, headers)
                self._json({"error": "not found"}, 404)

            do_GET = do_HEAD = do_POST = _route

        return Handler
