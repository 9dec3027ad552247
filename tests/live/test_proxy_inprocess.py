"""The proxy app in this process, called as a WSGI app (no gunicorn), against a real simulator: where a slot is
taken and given back, and what is recorded, can be read off the ledger and the traffic figures directly.

The process-level tests (test_proxy.py) show the same through gunicorn; these show the insides they imply.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pytest

from paddler_sync.balancer import Balancer
from paddler_sync.endings import Ending
from paddler_sync.settings import parse_settings
from tests.helpers import Fleet, Proc, good_report


class Answer:
    """What start_response was given, and the body."""

    def __init__(self) -> None:
        self.status = ""
        self.headers: list[tuple[str, str]] = []

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> None:
        self.status, self.headers = status, headers


def environ(method: str, path: str, body: dict[str, Any] | bytes | None = None) -> dict[str, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    return {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": "", "RAW_URI": path,
            "SERVER_PROTOCOL": "HTTP/1.1", "REMOTE_ADDR": "127.0.0.1", "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": str(len(data)), "wsgi.input": io.BytesIO(data), "wsgi.url_scheme": "http",
            "HTTP_HOST": "balancer"}


@pytest.fixture
def balancer(fleet: Fleet) -> Iterator[tuple[Balancer, Proc]]:
    sim = fleet.simulator("--parallel", "1", "--decode-tokens-per-second", "200")
    balancer = Balancer(parse_settings("balancer", args=["--buffered-request-timeout", "0.3"], config_files=[]))
    report = good_report(external_llamacpp_addr=f"127.0.0.1:{sim.port}", slots_idle=1, slots_processing=0,
                         total_slots=1)
    assert balancer.management.test_client().post("/api/v1/agents/a1/report", json=report).status_code == 200
    yield balancer, sim


def test_a_completion_takes_a_slot_while_it_streams_and_gives_it_back(balancer: tuple[Balancer, Proc]) -> None:
    app, _ = balancer
    answer = Answer()
    relay = app(environ("POST", "/completion", {"prompt": "x", "n_predict": 5, "stream": True}),
                answer.start_response)
    assert answer.status.startswith("200") and app.ledger.in_flight() == 1  # taken before the first byte
    chunks = iter(relay)
    first = next(c for c in chunks if c)  # an empty piece: the head sent ahead of a slow first event
    assert first.startswith(b"data: ") and app.ledger.in_flight() == 1  # held while it streams
    rest = b"".join(chunks)  # the last chunk ends the relay: the slot goes back there, once
    assert (first + rest).count(b"data: ") >= 5 and app.ledger.in_flight() == 0
    relay.close()  # and again when the WSGI server closes it: nothing more
    assert app.ledger.in_flight() == 0
    figures = app.traffic.summary("5m", app.traffic.started + 1)["fleet"]
    assert figures["requests"] == 1 and figures["tokens"] == 5 and figures["errors"] == {}


def test_a_client_that_leaves_mid_stream_gives_the_slot_back_once(balancer: tuple[Balancer, Proc]) -> None:
    app, _ = balancer
    answer = Answer()
    relay = app(environ("POST", "/completion", {"prompt": "x", "n_predict": 200, "stream": True}),
                answer.start_response)
    next(iter(relay))
    relay.close()  # what the WSGI server does when the client hangs up
    relay.close()
    assert app.ledger.in_flight() == 0 and relay.ending is Ending.CLIENT_GONE
    upstream = app.ledger.get("a1")  # llama.cpp may still run it until its next token: busy until a report says
    assert upstream is not None and upstream.lingering == 1 and upstream.free(app.ledger.clock()) == 0


def test_a_request_the_balancer_refuses_takes_nothing(balancer: tuple[Balancer, Proc]) -> None:
    app, _ = balancer
    answer = Answer()
    body = app(environ("POST", "/completion", b"x" * (app.options.max_request_body + 1)), answer.start_response)
    assert answer.status.startswith("413") and json.loads(b"".join(body))["error"]["type"] == "invalid_request_error"
    assert app.ledger.in_flight() == 0 and app.buffer.waiting == 0


def test_a_request_that_waits_too_long_is_answered_504_with_its_wait(balancer: tuple[Balancer, Proc]) -> None:
    app, _ = balancer
    holder = app(environ("POST", "/completion", {"prompt": "x", "n_predict": 5}), Answer().start_response)
    answer = Answer()
    refused = app(environ("POST", "/completion", {"prompt": "x", "n_predict": 5}), answer.start_response)
    assert answer.status.startswith("504") and dict(answer.headers).get("Retry-After") is None
    assert "--buffered-request-timeout" in json.loads(b"".join(refused))["error"]["message"]
    figures = app.traffic.summary("5m", app.traffic.started + 1)["fleet"]
    assert figures["errors"] == {"timed_out": 1} and figures["queue_wait_p95_seconds"] >= 0.3
    b"".join(holder)
    holder.close()
    assert app.ledger.in_flight() == 0


def test_served_in_process_on_port_0(balancer: tuple[Balancer, Proc]) -> None:
    """The same app behind gevent's WSGI server on a port the kernel picks, a real HTTP client in a thread."""
    import gevent
    import requests
    from gevent.pywsgi import WSGIServer

    app, _ = balancer
    server = WSGIServer(("127.0.0.1", 0), app, log=None)
    server.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/completion"
        pending = gevent.get_hub().threadpool.spawn(requests.post, url, timeout=10,
                                                    json={"prompt": "x", "n_predict": 3, "stream": True})
        response = pending.get(timeout=10)  # the hub serves the app meanwhile
        assert response.status_code == 200 and response.text.count("data: ") >= 3
        assert app.ledger.in_flight() == 0
    finally:
        server.stop(timeout=1)
