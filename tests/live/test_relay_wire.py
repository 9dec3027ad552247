"""The relay's own HTTP/1.1 on both sides, byte by byte: answers llama.cpp (or anything in its place) may send,
read by paddler_sync/proxy/answer.py, and what the client then receives from paddler_sync/proxy/response_writer.py.

A scripted upstream on loopback answers each case by the path asked for, with the framing a real server may
use; the balancer in front is the real one (gunicorn, gevent), and the client reads the raw bytes.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httptools
import pytest
import requests
from gunicorn.http.wsgi import Response

from paddler_sync.proxy.response_writer import ProxyResponse, adopt
from tests.helpers import Fleet, fleet_behind, health, wait_until

# path -> (writes, then) where each write is (bytes, pause after it) and then is "keep" (wait for the next
# request on the connection), "close" or "hang" (say nothing more)
SCRIPTS: dict[str, tuple[list[tuple[bytes, float]], str]] = {
    "/length-in-pieces": ([(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n", 0.02),
                           (b'{"content"', 0.05), (b':"ok"}', 0)], "keep"),
    "/chunked-extras": ([(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
                          b"3;name=value\r\nabc\r\n", 0.02), (b"2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n", 0)], "keep"),
    "/until-close": ([(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: text/plain\r\n\r\nall of", 0.02),
                      (b" it", 0)], "close"),
    "/interim": ([(b"HTTP/1.1 100 Continue\r\n\r\n", 0.02),
                  (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Type: text/plain\r\n\r\nafter", 0)], "keep"),
    "/no-content": ([(b"HTTP/1.1 204 No Content\r\n\r\n", 0)], "keep"),
    "/bytes-after-the-end": ([(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokSURPLUS", 0)], "keep"),
    "/cut-short": ([(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this", 0)], "close"),
    "/silent-mid-stream": ([(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked"
                             b"\r\n\r\n", 0.02), (b'f\r\ndata: {"a":1}\n\n\r\n', 0)], "hang"),
    "/malformed-chunk": ([(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot hex\r\n", 0)], "close"),
}
SCRIPTS["/completion"] = SCRIPTS["/silent-mid-stream"]
SCRIPTS["/slow-first-event"] = ([(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked"
                                  b"\r\n\r\n", 1.5), (b'f\r\ndata: {"a":1}\n\n\r\n0\r\n\r\n', 0)], "keep")
SCRIPTS["/slow-first-event-then-cut"] = ([(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                           b"Transfer-Encoding: chunked\r\n\r\n", 1.2)], "close")


@contextmanager
def scripted_upstream() -> Iterator[tuple[int, dict[str, int]]]:
    """Answers each request with SCRIPTS[path]; counts the connections it accepted and the requests it read."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    counts = {"connections": 0, "requests": 0}
    held: list[socket.socket] = []

    def serve_connection(conn: socket.socket) -> None:
        held.append(conn)
        buffered = b""
        while True:
            while b"\r\n\r\n" not in buffered:
                data = conn.recv(65536)
                if not data:
                    return
                buffered += data
            head, _, buffered = buffered.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            buffered = buffered[int(length.group(1)) if length else 0:]
            counts["requests"] += 1
            path = head.split(b" ")[1].decode().split("?")[0]
            writes, then = SCRIPTS[path]
            for data, pause in writes:
                conn.sendall(data)
                time.sleep(pause)
            if then == "close":
                conn.close()
                return
            if then == "hang":
                return  # held open, silent, until the test ends

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            counts["connections"] += 1
            threading.Thread(target=serve_connection, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1], counts
    finally:
        server.close()
        for conn in held:
            conn.close()


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[int, dict[str, int]]]:
    with scripted_upstream() as (port, counts):
        yield port, counts


def raw_exchange(port: int, requests_bytes: list[bytes], timeout: float = 10) -> list[tuple[int, dict, bytes, bool]]:
    """Send each request on one kept-alive connection and parse each answer as it comes: (status, headers,
    body, whether it arrived chunked). Fails if the framing is wrong or the connection closes early."""
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for request in requests_bytes:
            sock.sendall(request)
            answers.append(read_answer(sock, head_request=request.startswith(b"HEAD")))
    return answers


def read_answer(sock: socket.socket, head_request: bool = False) -> tuple[int, dict, bytes, bool]:
    class Collector:
        def __init__(self) -> None:
            self.headers: dict[str, str] = {}
            self.body = b""
            self.done = False

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers[name.decode().lower()] = value.decode()

        def on_headers_complete(self) -> None:
            if head_request:
                self.done = True

        def on_body(self, body: bytes) -> None:
            self.body += body

        def on_message_complete(self) -> None:
            self.done = True

    collector = Collector()
    parser = httptools.HttpResponseParser(collector)
    while not collector.done:
        data = sock.recv(65536)
        assert data, "the balancer closed the connection before its answer ended"
        parser.feed_data(data)
    chunked = collector.headers.get("transfer-encoding") == "chunked"
    return parser.get_status_code(), collector.headers, collector.body, chunked


def get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: balancer\r\n\r\n".encode()


def test_answers_in_every_framing_reach_the_client_whole_on_a_kept_alive_connection(
        fleet: Fleet, scripted: tuple[int, dict[str, int]]) -> None:
    port, counts = scripted
    balancer = fleet_behind(fleet, port)
    proxy = balancer.extra["proxy_port"]
    connections_before = counts["connections"]
    answers = raw_exchange(proxy, [get("/length-in-pieces"), get("/chunked-extras"), get("/interim"),
                                   get("/no-content"), get("/length-in-pieces"), get("/length-in-pieces")])
    statuses = [a[0] for a in answers]
    assert statuses == [200, 200, 200, 204, 200, 200]
    assert answers[0][2] == b'{"content":"ok"}' and answers[0][1]["content-length"] == "16"
    assert answers[1][2] == b"abcde" and answers[1][3]  # decoded upstream, framed again for the client
    assert answers[2][2] == b"after"  # the interim 100 is not passed on
    assert answers[3][2] == b"" and "content-length" not in answers[3][1]
    # the balancer kept its upstream connection alive through all of them
    assert counts["connections"] - connections_before == 1
    [(status, _, body, chunked)] = raw_exchange(proxy, [get("/until-close")])
    assert (status, body, chunked) == (200, b"all of it", True)  # read until llama.cpp closed, then framed
    [(status, _, body, _)] = raw_exchange(proxy, [get("/bytes-after-the-end")])
    assert (status, body) == (200, b"ok")
    after_surplus = counts["connections"]
    raw_exchange(proxy, [get("/length-in-pieces")])
    assert counts["connections"] == after_surplus + 1  # a connection with bytes past an answer is not reused


def test_a_head_request_is_answered_without_waiting_for_a_body(fleet: Fleet,
                                                               scripted: tuple[int, dict[str, int]]) -> None:
    port, _ = scripted
    SCRIPTS["/head"] = ([(b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\nContent-Type: text/plain\r\n\r\n", 0)], "keep")
    balancer = fleet_behind(fleet, port)
    started = time.monotonic()
    [(status, headers, body, _), (status2, _, body2, _)] = raw_exchange(
        balancer.extra["proxy_port"], [b"HEAD /head HTTP/1.1\r\nHost: b\r\n\r\n", get("/length-in-pieces")])
    assert (status, body, status2, body2) == (200, b"", 200, b'{"content":"ok"}')
    assert headers["content-length"] == "40"  # the length the same GET would have
    assert time.monotonic() - started < 5  # not the read timeout


def test_an_event_stream_s_head_reaches_the_client_before_its_first_event(
        fleet: Fleet, scripted: tuple[int, dict[str, int]]) -> None:
    """llama.cpp sends an event stream's head at once (a router's /models/sse, a long prefill): so does the relay."""
    port, _ = scripted
    balancer = fleet_behind(fleet, port)
    started = time.monotonic()
    with requests.get(balancer.extra["proxy"] + "/slow-first-event", stream=True, timeout=10) as response:
        head_after = time.monotonic() - started
        body = response.content
    assert head_after < 1.0 and time.monotonic() - started >= 1.4, head_after  # the head first, the event later
    assert response.status_code == 200 and body == b'data: {"a":1}\n\n'
    with pytest.raises(requests.exceptions.ChunkedEncodingError), \
            requests.get(balancer.extra["proxy"] + "/slow-first-event-then-cut", stream=True, timeout=10) as cut:
        assert cut.status_code == 200  # the head went out: a break-off now is a cut stream, not a 502
        cut.content  # noqa: B018
    wait_until(lambda: health(balancer)["requests_in_flight"] == 0)
    assert "Traceback" not in balancer.log()


def test_broken_answers_end_visibly_and_leak_nothing(fleet: Fleet, scripted: tuple[int, dict[str, int]]) -> None:
    port, _ = scripted
    balancer = fleet_behind(fleet, port, "--upstream-read-timeout", "1")
    proxy = balancer.extra["proxy"]
    malformed = requests.get(proxy + "/malformed-chunk", timeout=10)
    assert malformed.status_code == 502 and malformed.json()["error"]["type"] == "server_error"
    with pytest.raises(requests.exceptions.ChunkedEncodingError):  # Content-Length promised more: cut visibly
        requests.get(proxy + "/cut-short", timeout=10).content  # noqa: B018
    # silent mid-stream on a slot path: the first event, then llama.cpp's own error line, then the cut
    started = time.monotonic()
    received = b""
    with pytest.raises(requests.exceptions.ChunkedEncodingError), \
            requests.post(proxy + "/completion", json={"prompt": "x", "stream": True}, stream=True,
                          timeout=10) as response:
        for chunk in response.iter_content(None):
            received += chunk
    assert time.monotonic() - started < 8
    assert received.startswith(b'data: {"a":1}\n\n')
    error = json.loads(received.split(b"error: ", 1)[1])
    assert error["error"]["code"] == "upstream_stopped" and "broke off its answer" in error["error"]["message"]
    wait_until(lambda: health(balancer)["requests_in_flight"] == 0)
    log = balancer.log()
    assert re.search(r'"POST /completion" 200 upstream=127.0.0.1:\d+ .* end=upstream_error', log)
    assert "broke off the response" in log and "TimeoutError" in log


def test_the_balancer_s_own_writes_keep_gunicorn_s_http_rules() -> None:
    """ProxyResponse: the head goes out with the first body bytes; framing, HEAD, 204 and keep-alive as gunicorn's."""

    class Sock:
        def __init__(self) -> None:
            self.sends: list[bytes] = []

        def send(self, data: Any) -> int:
            self.sends.append(bytes(data))
            return len(data)

    class Req:
        def __init__(self, method: str, version: tuple[int, int] = (1, 1)) -> None:
            self.method, self.version = method, version

        def should_close(self) -> bool:
            return False

    class Cfg:
        protocol = "http"

    def respond(method: str, status: str, headers: list[tuple[str, str]], body: list[bytes],
                version: tuple[int, int] = (1, 1)) -> tuple[list[bytes], Any]:
        sock = Sock()
        response = Response(Req(method, version), sock, Cfg())
        assert adopt(response.start_response) and isinstance(response, ProxyResponse)
        response.start_response(status, headers)
        for piece in body:
            response.write(piece)
        response.close()
        return sock.sends, response

    sends, response = respond("POST", "200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")],
                              [b"ok"])
    assert len(sends) == 1 and sends[0].endswith(b"\r\n\r\nok") and b"Connection: keep-alive" in sends[0]
    assert not response.should_close()
    sends, response = respond("POST", "200 OK", [("Content-Type", "text/event-stream")], [b"data: 1\n\n", b"x"])
    assert b"Transfer-Encoding: chunked\r\n" in sends[0] and sends[0].endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n")
    assert sends[1:] == [b"1\r\nx\r\n", b"0\r\n\r\n"] and not response.should_close()
    sends, _ = respond("HEAD", "200 OK", [("Content-Length", "40")], [b""])
    assert len(sends) == 1 and sends[0].endswith(b"Content-Length: 40\r\n\r\n")
    sends, _ = respond("GET", "204 No Content", [], [])
    assert len(sends) == 1 and sends[0].endswith(b"\r\n\r\n") and b"Transfer-Encoding" not in sends[0]
    sends, response = respond("GET", "200 OK", [], [b"old"], version=(1, 0))
    assert sends[0].endswith(b"\r\n\r\nold") and response.should_close()  # HTTP/1.0: no chunks, close to end


def test_the_relay_reads_gevent_sockets_through_the_parts_it_relies_on() -> None:
    """SocketReader waits on a gevent socket's own read watcher and reads its OS socket (answer.py says why)."""
    import _socket

    import gevent.socket

    from paddler_sync.proxy.answer import SocketReader

    sock = gevent.socket.socket()
    try:
        reader = SocketReader(sock, 1.0)
        assert isinstance(reader.raw, _socket.socket) and reader.watcher is sock._read_event is not None
    finally:
        sock.close()


def test_a_silent_stream_is_cut_after_the_read_timeout_with_queue_updates_on(
        fleet: Fleet, scripted: tuple[int, dict[str, int]]) -> None:
    """With --queue-updates the answer's head is read in the greenlet that waited for the slot and its body in the
    request's own: the read timeout must follow the reader."""
    port, _ = scripted
    balancer = fleet_behind(fleet, port, "--upstream-read-timeout", "1", "--queue-updates")
    started = time.monotonic()
    received = b""
    with pytest.raises(requests.exceptions.ChunkedEncodingError), \
            requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "x", "stream": True}, stream=True,
                          headers={"X-Paddler-Queue-Updates": "1"}, timeout=15) as response:
        for chunk in response.iter_content(None):
            received += chunk
    assert time.monotonic() - started < 8
    events = re.sub(rb"^(: queue position=.*\n\n)*", b"", received)  # a loaded machine may be slower than QUIET_WAIT
    assert events.startswith(b'data: {"a":1}\n\n') and b"upstream_stopped" in events
    wait_until(lambda: health(balancer)["requests_in_flight"] == 0)
