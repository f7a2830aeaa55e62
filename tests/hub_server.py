"""A loopback HTTP server standing in for the Hugging Face Hub (``HF_ENDPOINT``): it serves
``/{repo}/resolve/{revision}/{path}`` with the headers huggingface_hub reads (commit, etag = sha256,
size), honours Range requests, records what it was asked, and can be told to misbehave."""
from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<path>.+)$")


@dataclass
class FakeHub:
    files: dict[str, bytes] = field(default_factory=dict)  # "owner/name/path" -> content
    requests: list[tuple[str, str, dict]] = field(default_factory=list)
    cut_next_get_after: int | None = None  # drop the connection after this many bytes, once
    corrupt: bool = False  # serve different bytes than the advertised hash
    down_after_cut: bool = False  # after the cut, answer every GET with 503 until reset
    down: bool = False

    def add(self, repo: str, path: str, content: bytes) -> None:
        self.files[f"{repo}/{path}"] = content


def start(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _lookup(self):
            match = _RESOLVE.match(self.path.split("?")[0])
            if match is None:
                return None
            return hub.files.get(f"{match['repo']}/{match['path']}")

        def _headers(self, content: bytes, status: int, length: int, extra: dict | None = None):
            self.send_response(status)
            sha = hashlib.sha256(content).hexdigest()
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{sha}"')
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(content)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(length))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()

        def do_HEAD(self):
            hub.requests.append(("HEAD", self.path, dict(self.headers)))
            content = self._lookup()
            if content is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._headers(content, 200, len(content))

        def do_GET(self):
            hub.requests.append(("GET", self.path, dict(self.headers)))
            if hub.down:
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            content = self._lookup()
            if content is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = bytes(b ^ 0xFF for b in content) if hub.corrupt else content
            start_at = 0
            range_header = self.headers.get("Range")
            if range_header:
                start_at = int(re.match(r"bytes=(\d+)-", range_header).group(1))
                self._headers(content, 206, len(body) - start_at, {"Content-Range": f"bytes {start_at}-{len(body) - 1}/{len(body)}"})
            else:
                self._headers(content, 200, len(body))
            payload = body[start_at:]
            if hub.cut_next_get_after is not None:
                cut, hub.cut_next_get_after = hub.cut_next_get_after, None
                hub.down = hub.down_after_cut
                self.wfile.write(payload[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(payload)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
