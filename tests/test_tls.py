"""TLS on the relay's port: wss:// for members, fan-out included, and https for /healthz."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import urllib.request
from pathlib import Path

import pytest
import trustme
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage

from kasagi_relay.config import Config, ConfigError
from kasagi_relay.tls import server_context
from testkit.relay import MSGPACK, RelayProcess, connect_client, relay_process, start_relay


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 signed by `ca`: (chain PEM path, key PEM path)."""
    issued = ca.issue_cert("127.0.0.1", "localhost")
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return str(chain), str(key)


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def get_health(url: str, context: ssl.SSLContext) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(url, context=context, timeout=5) as resp:
        body: dict[str, object] = json.loads(resp.read())
        return resp.status, body


async def test_members_get_every_delta_over_tls(
    ca: trustme.CA, cert_files: tuple[str, str]
) -> None:
    """Both subprotocols, a writer, 50 deltas: each member sees seq 1..50 once, in order.

    With the native engine a broadcast writes plain-TCP members' sockets directly; a TLS
    member must go through its transport, or it would receive unencrypted bytes and fail."""
    chain, key = cert_files
    async with start_relay(tls_cert=chain, tls_key=key) as relay:
        assert relay.url.startswith("wss://127.0.0.1:")
        context = trusting(ca)
        async with (
            connect_client(relay.url, ssl=context) as a,
            connect_client(relay.url, MSGPACK, ssl=context) as b,
            connect_client(relay.url, ssl=context) as writer,
        ):
            await a.join("r")
            await b.join("r")
            for i in range(1, 51):
                await writer.delta("r", merge={"n": i})
            for member in (a, b):
                seqs: list[int] = []
                while not seqs or seqs[-1] < 50:
                    frame = await member.expect("delta")
                    assert frame["from"] == (seqs[-1] + 1 if seqs else 1)
                    seqs.extend(range(frame["from"], frame["seq"] + 1))
                assert seqs == list(range(1, 51))
        health = relay.url.replace("wss://", "https://").replace("/ws", "/healthz")
        status, body = await asyncio.to_thread(get_health, health, context)
        assert status == 200 and body["ok"] is True
        # A plain ws:// client gets no WebSocket from a TLS port.
        with pytest.raises(InvalidMessage):
            async with connect(relay.url.replace("wss://", "ws://"), open_timeout=5):
                pass


async def test_command_line_serves_wss(ca: trustme.CA, cert_files: tuple[str, str]) -> None:
    chain, key = cert_files
    async with relay_process("--tls-cert", chain, "--tls-key", key) as proc:
        assert proc.url.startswith("wss://")
        async with connect_client(proc.url, ssl=trusting(ca)) as client:
            joined = await client.join("r")
            assert joined["seq"] == 0


def test_key_in_the_certificate_file(cert_files: tuple[str, str], tmp_path: Path) -> None:
    chain, key = cert_files
    both = tmp_path / "both.pem"
    both.write_bytes(Path(key).read_bytes() + Path(chain).read_bytes())
    assert isinstance(server_context(Config(tls_cert=str(both))), ssl.SSLContext)
    assert server_context(Config()) is None


def test_bad_tls_settings_are_config_errors(ca: trustme.CA, cert_files: tuple[str, str]) -> None:
    chain, _ = cert_files
    other_key = ca.issue_cert("127.0.0.1").private_key_pem
    with pytest.raises(ConfigError, match="needs --tls-cert"):
        server_context(Config(tls_key="key.pem"))
    with pytest.raises(ConfigError, match=r"no such file: /nonexistent/chain\.pem$"):
        server_context(Config(tls_cert="/nonexistent/chain.pem"))
    with pytest.raises(ConfigError, match=r"no such file: /nonexistent/key\.pem$"):
        server_context(Config(tls_cert=chain, tls_key="/nonexistent/key.pem"))
    with pytest.raises(ConfigError, match="cannot load"):
        server_context(Config(tls_cert=chain))  # no key anywhere
    wrong = Path(chain).with_name("wrong-key.pem")
    other_key.write_to_path(str(wrong))
    with pytest.raises(ConfigError, match="cannot load"):
        server_context(Config(tls_cert=chain, tls_key=str(wrong)))


def write_cert(issued: trustme.LeafCert, chain: Path, key: Path) -> bytes:
    """Write `issued` as (chain, key) PEM files; its DER, as a client sees it."""
    chain.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    issued.private_key_pem.write_to_path(str(key))
    return ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode())


async def served_cert(url: str, context: ssl.SSLContext) -> bytes:
    """The certificate a new TLS connection to the relay is given (DER)."""
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return der


async def logged(proc: RelayProcess, text: str, after: int) -> None:
    """Wait until a stderr line past the first `after` contains `text`."""
    async with asyncio.timeout(10):
        while not any(text in line for line in proc.stderr_lines[after:]):  # noqa: ASYNC110 (another task appends the lines)
            await asyncio.sleep(0.05)


async def test_sighup_reloads_the_certificate_for_new_connections(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """A renewed certificate is served to new connections after SIGHUP; a file that does not
    load is logged and the previous certificate stays; open connections are untouched."""
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    first = write_cert(ca.issue_cert("127.0.0.1"), chain, key)
    async with relay_process("--tls-cert", str(chain), "--tls-key", str(key)) as proc:
        context = trusting(ca)
        async with connect_client(proc.url, ssl=context) as member:
            await member.join("r")
            assert await served_cert(proc.url, context) == first

            chain.write_text("not a certificate\n")
            seen = len(proc.stderr_lines)
            proc.proc.send_signal(signal.SIGHUP)
            await logged(proc, "TLS reload failed", seen)
            assert await served_cert(proc.url, context) == first

            second = write_cert(ca.issue_cert("127.0.0.1"), chain, key)
            assert second != first
            seen = len(proc.stderr_lines)
            proc.proc.send_signal(signal.SIGHUP)
            await logged(proc, "TLS certificate reloaded", seen)
            assert await served_cert(proc.url, context) == second

            # The connection opened before both reloads still works.
            ack = await member.delta("r", merge={"a": 1})
            assert ack is not None and ack["seq"] == 1
        assert proc.returncode is None
