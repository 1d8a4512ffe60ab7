"""The inspector page and the browser client, served by the relay (docs/operations.md).

`GET /` and `GET /inspector` serve the page, `GET /inspector.js` its script and
`GET /kasagi-client.js` the JavaScript client (clients/js built as one ES module, shipped in
the package as kasagi_relay/static/kasagi-client.js), which any page can import. The files
are read once, when the relay starts: a request costs a dictionary lookup and never touches
the disk. Each answer carries a strong ETag (a digest of the bytes) and `no-cache` (revalidate,
then 304), so a page always runs the client of the relay it talks to. Nothing secret is in
them: a token is typed into the page, never served.
"""

from __future__ import annotations

import hashlib
import http
from dataclasses import dataclass
from importlib import resources

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

__all__ = ["Inspector", "StaticFile"]

# Route -> (file in kasagi_relay/static, Content-Type).
ROUTES: dict[str, tuple[str, str]] = {
    "/": ("inspector.html", "text/html; charset=utf-8"),
    "/inspector": ("inspector.html", "text/html; charset=utf-8"),
    "/inspector.js": ("inspector.js", "text/javascript; charset=utf-8"),
    "/kasagi-client.js": ("kasagi-client.js", "text/javascript; charset=utf-8"),
}


@dataclass(frozen=True, slots=True)
class StaticFile:
    body: bytes
    content_type: str
    etag: str


class Inspector:
    """The static routes; `answer` gives None for any other path."""

    def __init__(self) -> None:
        folder = resources.files("kasagi_relay") / "static"
        self.files: dict[str, StaticFile] = {}
        for route, (name, content_type) in ROUTES.items():
            body = (folder / name).read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            self.files[route] = StaticFile(body, content_type, etag)

    def answer(self, path: str, request: Request) -> Response | None:
        file = self.files.get(path)
        if file is None:
            return None
        # The header is bounded by websockets' own limit on a request line (8 KiB).
        fresh = request.headers.get("If-None-Match", "")
        status = 304 if file.etag in (t.strip() for t in fresh.split(",")) else 200
        body = b"" if status == 304 else file.body
        headers = Headers(
            [
                ("Content-Type", file.content_type),
                ("Content-Length", str(len(body))),
                ("ETag", file.etag),
                ("Cache-Control", "no-cache"),
                ("X-Content-Type-Options", "nosniff"),
                ("Connection", "close"),
            ]
        )
        return Response(status, http.HTTPStatus(status).phrase, headers, body)
