"""Where the wire matters: a real uvicorn server (dispatcher off, so no Ray), raw sockets.

An upload must cost the server nothing before its key is checked, and a body without a declared
length (``Transfer-Encoding: chunked``) must be cut off at the limit while it streams, not after
it has been spooled whole."""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from server import Server

from prunepilot.service.client import ApiError, Client

LIMIT = 100_000  # PRUNEPILOT_MAX_UPLOAD_BYTES; the body limit is 2 x this + 1 MiB
BOUNDARY = "ppboundary"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    srv = Server(tmp_path_factory.mktemp("limits"), {"PRUNEPILOT_MAX_UPLOAD_BYTES": str(LIMIT), "PRUNEPILOT_RUN_DISPATCHER": "0"})
    srv.key = srv.prepare("alice")["alice"]
    srv.start()
    yield srv
    srv.stop()


def _open_chunked_post(url: str, key: str | None) -> socket.socket:
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port), timeout=10)
    head = ["POST /v1/jobs HTTP/1.1", f"Host: {u.hostname}:{u.port}", "Transfer-Encoding: chunked",
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}"]
    if key is not None:
        head.append(f"Authorization: Bearer {key}")
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    part = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"weights\"; filename=\"w.th\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
    return sock


def _send_until_answered(sock: socket.socket, total: int, chunk: int = 64 * 1024) -> tuple[int, bytes]:
    """Stream ``total`` bytes of body in chunks, never ending the body; stop early once the server answers.
    Returns (bytes sent, the start of the answer, or b'' if none came within 10 s of the last chunk)."""
    payload = b"%x\r\n%s\r\n" % (chunk, b"\0" * chunk)
    sent = 0
    while sent < total:
        if select.select([sock], [], [], 0)[0]:
            break
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += chunk
    try:
        sock.settimeout(10)
        return sent, sock.recv(4096)
    except (TimeoutError, ConnectionResetError):
        return sent, b""


def _read_answer(sock: socket.socket, first: bytes = b"") -> bytes:
    """The whole response (headers and body), however the server split it into segments."""
    data = first
    sock.settimeout(10)
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
        if sep and lengths and len(body) >= lengths[0]:
            return data
        try:
            more = sock.recv(4096)
        except (TimeoutError, ConnectionResetError):
            return data
        if not more:
            return data
        data += more


def test_an_upload_without_a_key_is_refused_before_its_body_is_read(server) -> None:
    sock = _open_chunked_post(server.url, key=None)
    try:
        sock.sendall(b"%x\r\n%s\r\n" % (65536, b"\0" * 65536))  # the body goes on; the server must not wait for it
        sock.settimeout(10)
        answer = _read_answer(sock, sock.recv(4096))
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"missing API key" in answer


def test_a_chunked_upload_is_cut_off_at_the_limit_while_it_streams(server) -> None:
    sock = _open_chunked_post(server.url, key=server.key)
    try:
        sent, answer = _send_until_answered(sock, total=64 * 1024 * 1024)
        answer = _read_answer(sock, answer)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 413"), (sent, answer[:200])
    assert b"upload limit" in answer
    assert sent < 64 * 1024 * 1024  # answered while the body was still coming


def test_an_upload_with_a_bad_key_is_refused(server) -> None:
    sock = _open_chunked_post(server.url, key="pp_not-a-key")
    try:
        sock.settimeout(10)
        answer = _read_answer(sock, sock.recv(4096))
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 401") and b"invalid or revoked API key" in answer


def test_a_declared_length_over_the_limit_is_refused_at_once(server, resnet20_weights: Path, mini_zip: Path) -> None:
    with Client(server.url, server.key) as c, pytest.raises(ApiError) as err:
        c.submit({"arch": "resnet20", "dataset": "upload", "budget": {"constraints": [{"resource": "flops", "ratio": 0.5}]}},
                 resnet20_weights, mini_zip)
    assert err.value.status == 413


def test_the_server_still_serves_after_the_refusals(server) -> None:
    time.sleep(0.2)
    with Client(server.url, server.key) as c:
        assert c.jobs()["total"] == 0
