"""The inspector page and /kasagi-client.js, served by a real relay over real HTTP."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kasagi_relay.cli import parse_config
from testkit.relay import start_relay

STATIC = Path(__file__).resolve().parent.parent / "kasagi_relay" / "static"


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def http_base(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://").removesuffix("/ws")


async def fetch(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(get, url, headers)


async def test_page_script_and_client_with_their_types_and_etags() -> None:
    async with start_relay() as relay:
        base = http_base(relay.url)
        status, headers, page = await fetch(base + "/")
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert page == (STATIC / "inspector.html").read_bytes()
        assert b'src="/inspector.js"' in page
        assert (await fetch(base + "/inspector"))[2] == page
        status, headers, script = await fetch(base + "/kasagi-client.js")
        assert status == 200 and headers["Content-Type"] == "text/javascript; charset=utf-8"
        assert b"export {" in script and b"Client," in script
        assert headers["X-Content-Type-Options"] == "nosniff"
        assert headers["Cache-Control"] == "no-cache"
        etag = headers["ETag"]
        # Revalidation: the same bytes are not sent again.
        status, headers, body = await fetch(base + "/kasagi-client.js", {"If-None-Match": etag})
        assert (status, body, headers["ETag"]) == (304, b"", etag)
        status, _, body = await fetch(base + "/kasagi-client.js", {"If-None-Match": '"other"'})
        assert (status, body) == (200, script)
        status, headers, _ = await fetch(base + "/inspector.js?v=1")
        assert status == 200 and headers["Content-Type"].startswith("text/javascript")
        # Nothing else is served from the package's folder.
        for path in ("/static/inspector.html", "/inspector.html", "/../pyproject.toml", "/x.js"):
            assert (await fetch(base + path))[0] == 404


async def test_no_inspector_serves_none_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KASAGI_NO_INSPECTOR", raising=False)
    assert parse_config(["--no-inspector"]).inspector is False
    assert parse_config([]).inspector is True
    monkeypatch.setenv("KASAGI_NO_INSPECTOR", "1")
    assert parse_config([]).inspector is False
    monkeypatch.setenv("KASAGI_NO_INSPECTOR", "0")
    assert parse_config([]).inspector is True
    async with start_relay(parse_config(["--no-inspector"])) as relay:
        base = http_base(relay.url)
        for path in ("/", "/inspector", "/inspector.js", "/kasagi-client.js"):
            assert (await fetch(base + path))[0] == 404
        assert (await fetch(base + "/healthz"))[0] == 200


@pytest.mark.parametrize("name", ["inspector.html", "inspector.js", "kasagi-client.js"])
def test_the_wheel_carries_the_static_files(name: str) -> None:
    """pyproject's [tool.maturin] include names every file the routes serve."""
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert f'"kasagi_relay/static/{name}"' in text
    assert (STATIC / name).stat().st_size > 0


def test_no_secret_in_the_page() -> None:
    for name in ("inspector.html", "inspector.js"):
        text = (STATIC / name).read_text().lower()
        assert "localstorage" not in text and "sessionstorage" not in text and "cookie" not in text
