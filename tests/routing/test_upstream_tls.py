"""FastUpstream over https:// against a local TLS server with a self-signed certificate made by the test."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from routing.upstream import FastUpstream, Timeouts, UpstreamConnectError, UpstreamTooLarge

T = Timeouts(connect=5.0, read=5.0, write=5.0, pool=5.0)
BOUND = 15.0


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for the name localhost (not for 127.0.0.1), and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    yield cert_file, key_file


class TLSServer:
    """An HTTP/1.1 server over TLS answering each request with `answer` (keep-alive)."""

    def __init__(self, certificate: tuple[Path, Path], answer: bytes) -> None:
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(*certificate)
        self.answer = answer
        self.connections = 0
        self.heads: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> TLSServer:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                writer.write(self.answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            return
        finally:
            writer.close()


@pytest.fixture
async def trusting(certificate: tuple[Path, Path]) -> AsyncIterator[FastUpstream]:
    """A FastUpstream that trusts the test certificate."""
    context = ssl.create_default_context(cafile=str(certificate[0]))
    client = FastUpstream(ssl_context=context, max_header_line_bytes=256)
    yield client
    await client.aclose()


async def test_https_request_and_keepalive(certificate: tuple[Path, Path], trusting: FastUpstream) -> None:
    # Given a TLS backend with a certificate the client trusts
    answer = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}'
    async with TLSServer(certificate, answer) as server, asyncio.timeout(BOUND):
        for _ in range(3):
            # When requests are sent over https://
            response = await trusting.send(
                "POST", f"https://localhost:{server.port}/v1/x", headers={}, content=b"{}", timeouts=T, stream=False
            )
            # Then they are answered, on one kept-alive connection
            assert (response.status_code, response.content) == (200, b'{"ok":true}')
        assert server.connections == 1
        assert server.heads[0].startswith(b"POST /v1/x HTTP/1.1\r\nhost: localhost:%d\r\n" % server.port)
        assert list(trusting.pool_stats()) == [f"https://localhost:{server.port}"]


async def test_https_streamed_chunked(certificate: tuple[Path, Path], trusting: FastUpstream) -> None:
    answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\ndata: \r\n3\r\nabc\r\n0\r\n\r\n"
    async with TLSServer(certificate, answer) as server, asyncio.timeout(BOUND):
        response = await trusting.send(
            "POST", f"https://localhost:{server.port}/x", headers={}, content=b"{}", timeouts=T, stream=True
        )
        assert b"".join([chunk async for chunk in response.aiter_raw()]) == b"data: abc"
        await response.aclose()


async def test_https_limits_apply(certificate: tuple[Path, Path], trusting: FastUpstream) -> None:
    answer = b"HTTP/1.1 200 OK\r\nx-long: " + b"a" * 300 + b"\r\ncontent-length: 0\r\n\r\n"
    async with TLSServer(certificate, answer) as server, asyncio.timeout(BOUND):
        with pytest.raises(UpstreamTooLarge):
            await trusting.send(
                "POST", f"https://localhost:{server.port}/x", headers={}, content=b"{}", timeouts=T, stream=False
            )


async def test_untrusted_certificate_is_refused(certificate: tuple[Path, Path]) -> None:
    # Given the default context (system CAs), a self-signed certificate is a connect error: nothing was sent
    client = FastUpstream()
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    try:
        async with TLSServer(certificate, answer) as server, asyncio.timeout(BOUND):
            with pytest.raises(UpstreamConnectError):
                await client.send(
                    "POST", f"https://localhost:{server.port}/x", headers={}, content=b"{}", timeouts=T, stream=False
                )
            assert server.heads == []
    finally:
        await client.aclose()


async def test_wrong_host_name_is_refused(certificate: tuple[Path, Path], trusting: FastUpstream) -> None:
    # The certificate names localhost, not 127.0.0.1: a trusted certificate for another name is refused
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    async with TLSServer(certificate, answer) as server, asyncio.timeout(BOUND):
        with pytest.raises(UpstreamConnectError):
            await trusting.send(
                "POST", f"https://127.0.0.1:{server.port}/x", headers={}, content=b"{}", timeouts=T, stream=False
            )
        assert server.heads == []


def test_https_under_uvloop(certificate: tuple[Path, Path]) -> None:
    # The production loop: uvloop's TLS transport, streamed and whole bodies, keep-alive.
    async def scenario() -> None:
        client = FastUpstream(ssl_context=ssl.create_default_context(cafile=str(certificate[0])))
        answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        try:
            async with TLSServer(certificate, answer) as server, asyncio.timeout(BOUND):
                url = f"https://localhost:{server.port}/x"
                for stream in (False, True, False):
                    response = await client.send("POST", url, headers={}, content=b"{}", timeouts=T, stream=stream)
                    assert await response.aread() == b"abc"
                    await response.aclose()
                assert server.connections == 1
        finally:
            await client.aclose()

    uvloop.run(scenario())
