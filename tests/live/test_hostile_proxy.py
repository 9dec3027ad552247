"""Hostile requests on the proxy port: limits answer with clear JSON errors, fuzzing finds no 500 of ours.

The requests go over raw sockets, so what is sent is exactly what hypothesis drew: odd methods,
paths, header names and bodies, chunked or not. The balancer may relay the simulator's own answer
(llama.cpp itself answers 500 to broken JSON and 501 to POST /props; its error codes are numbers,
the balancer's are words), but it must never fail by itself, never hang, and leave nothing in
flight or leaked.
"""

from __future__ import annotations

import json
import socket
import string

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import Fleet, Proc, internals, settled, start_fleet

pytestmark = pytest.mark.both_stores  # every test with a fleet runs on both slot stores

READ_TIMEOUT = 15.0


def exchange(port: int, raw: bytes) -> bytes:
    """Send raw bytes and read until the balancer closes (every request says Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as conn:
        conn.sendall(raw)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    return received


def head_and_body(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def error_message(response: requests.Response) -> str:
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    return response.json()["error"]["message"]


@pytest.mark.ledger_agnostic
def test_limits_on_request_line_and_headers_are_clear_json_errors(fleet: Fleet) -> None:
    balancer, _ = start_fleet(fleet, [2], "--max-request-line", "1024", "--max-header-size", "512",
                              "--max-headers", "20", "--max-request-body", "4k")
    proxy = balancer.extra["proxy"]

    too_long = requests.get(proxy + "/health?pad=" + "a" * 2000, timeout=10)
    assert too_long.status_code == 414 and "--max-request-line" in error_message(too_long)

    big_header = requests.get(proxy + "/health", headers={"X-Big": "b" * 1000}, timeout=10)
    assert big_header.status_code == 431 and "--max-header-size" in error_message(big_header)

    many = requests.get(proxy + "/health", headers={f"X-H{i}": "v" for i in range(30)}, timeout=10)
    assert many.status_code == 431 and "--max-headers" in error_message(many)

    big_body = requests.post(proxy + "/completion", data=b"{" + b" " * 5000 + b"}", timeout=10,
                             headers={"Content-Type": "application/json"})
    assert big_body.status_code == 413 and error_message(big_body)

    status, headers, body = head_and_body(exchange(balancer.extra["proxy_port"], b"NOT HTTP\r\n\r\n"))
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"]["message"]

    within = requests.get(proxy + "/health", headers={f"X-H{i}": "v" * 100 for i in range(10)}, timeout=10)
    assert within.status_code == 200


TOKEN = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
PATHS = ["/completion", "/completions", "/v1/completions", "/v1/chat/completions", "/chat/completions",
         "/health", "/v1/health", "/slots", "/props", "/v1/models", "/tokenize", "/detokenize", "/embedding",
         "/metrics", "/nowhere", "/api/v1/agents", ""]
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=False)
                           | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3), max_leaves=6)
COMPLETIONS = st.fixed_dictionaries(
    {"prompt": st.text(max_size=40)},
    optional={"n_predict": st.integers(-2, 6), "max_tokens": st.integers(0, 6), "stream": st.booleans(),
              "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                          "content": JSON_VALUES}), max_size=2),
              "id_slot": st.integers(-2, 5), "cache_prompt": JSON_VALUES, "model": JSON_VALUES})
BODIES = (st.just(b"")
          | st.binary(max_size=300)
          | JSON_VALUES.map(lambda v: json.dumps(v).encode())
          | COMPLETIONS.map(lambda v: json.dumps(v).encode()))


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "POST", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"])
                  | st.text(string.ascii_uppercase, min_size=1, max_size=12))
    suffix = st.sampled_from(["", "", "", "", "", "", "/", "?", "?a=1&b", "/%00", "/../x", "%zz"])
    path = draw(st.sampled_from(PATHS)) + draw(suffix | st.text(string.ascii_letters + "/%?&=.-", max_size=20))
    headers = draw(st.lists(st.tuples(st.text(TOKEN, min_size=1, max_size=20),
                                      st.text(string.printable.strip() + " ", max_size=60)), max_size=6))
    headers = [(n, v) for n, v in headers if n.lower() not in ("content-length", "transfer-encoding", "connection",
                                                               "expect", "upgrade")]
    if draw(st.booleans()):
        headers.append(("Content-Type", draw(st.sampled_from(["application/json", "text/plain", "x/y;;"]))))
    body = draw(BODIES)
    framing = draw(st.sampled_from(["length", "chunked", "none"]))
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        body = (f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n") if body else b"0\r\n\r\n"
    else:
        body = b""
    headers.append(("Connection", "close"))
    head = f"{method} /{path.lstrip('/')} HTTP/1.1\r\nHost: fuzz\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    return head.encode("latin-1", "replace") + b"\r\n" + body


def check_answer(balancer: Proc, raw: bytes) -> None:
    response = exchange(balancer.extra["proxy_port"], raw)
    if not response:
        return  # a clean close is an answer too
    status, _, body = head_and_body(response)
    if status < 400 or raw.startswith(b"HEAD "):
        return
    error = json.loads(body)["error"]
    assert error["message"], (raw[:300], response[:500])
    relayed = isinstance(error["code"], int)  # llama.cpp's codes are numbers, the balancer's are words
    assert status < 500 or relayed or status in (502, 503, 504), (raw[:300], response[:500])


def test_fuzzed_proxy_requests_get_answers_never_our_500(fleet: Fleet) -> None:
    balancer, _ = start_fleet(fleet, [2, 2], "--max-request-body", "64k", "--buffered-request-timeout", "5",
                              sim_args=("--decode-tokens-per-second", "0"))
    baseline = internals(balancer)

    @settings(max_examples=250, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(raw=raw_requests())
    def fuzz(raw: bytes) -> None:
        check_answer(balancer, raw)

    fuzz()
    settled(balancer, baseline)
    assert "Traceback" not in balancer.log(), balancer.log()[-3000:]


@pytest.mark.ledger_agnostic
def test_a_script_name_header_moves_nothing(fleet: Fleet) -> None:
    """gunicorn trusts SCRIPT_NAME / PATH_INFO headers from loopback by default; found by the fuzzer above: a
    client's ``SCRIPT_NAME: 0`` got a 500 HTML page. The balancer mounts nothing under a path, so they are ignored."""
    balancer, _ = start_fleet(fleet, [1])
    for header in (b"SCRIPT_NAME: 0", b"SCRIPT_NAME: /health", b"PATH_INFO: /slots"):
        raw = b"GET /health HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n"
        status, _, body = head_and_body(exchange(balancer.extra["proxy_port"], raw))
        assert status == 200 and json.loads(body) == {"status": "ok"}, (header, body)
