"""The simulator answers like the recorded llama-server b4748: status, headers, JSON fields, SSE framing.

Each case replays a capture's request against a simulator started with matching flags and
compares: the status line; every header (name and value, but Date, which gevent adds, and values
that are lengths or times); JSON bodies key by key, in order, with the same types; SSE streams event
by event shape, with or without ``[DONE]``; metrics by their series.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import Fleet

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
VARYING_HEADERS = {"content-length", "process-start-time-unix"}


@dataclass
class Capture:
    status: str
    headers: list[tuple[str, str]]
    body: str


def load_capture(name: str) -> Capture:
    text = (CAPTURES / name).read_text()
    lines = text.split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("HTTP/1.1 "))
    status = lines[start][len("HTTP/1.1 "):].strip()
    headers = []
    i = start + 1
    while i < len(lines) and lines[i].strip():
        key, _, value = lines[i].partition(":")
        headers.append((key.strip(), value.strip()))
        i += 1
    return Capture(status, headers, "\n".join(lines[i + 1:]))


def shape(value: Any) -> Any:
    """A JSON value's structure: dict keys in order, list element shapes, and coarse types."""
    if isinstance(value, dict):
        return [(k, shape(v)) for k, v in value.items()]
    if isinstance(value, list):
        return ["list", shape(value[0]) if value else None]
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def sse_events(body: str) -> list[str]:
    return [block for block in body.replace("\r\n", "\n").split("\n\n") if block.strip()]


def event_json(block: str) -> Any:
    assert block.startswith("data: "), block
    return json.loads(block[len("data: "):])


def assert_same_headers(captured: list[tuple[str, str]], got: requests.structures.CaseInsensitiveDict) -> None:
    names = {k.lower() for k, _ in captured}
    got_names = {k.lower() for k in got} - {"date"}
    assert got_names == names, f"headers differ: missing {names - got_names}, extra {got_names - names}"
    for key, value in captured:
        if key.lower() not in VARYING_HEADERS:
            assert got[key] == value, f"{key}: {got[key]!r} != {value!r}"


def named_events(body: str) -> list[tuple[str, Any]]:
    """(event name, data shape) of each block of a stream framed with ``event:`` lines; runs of one name
    (the deltas, one per token) count once."""
    out: list[tuple[str, Any]] = []
    for block in sse_events(body):
        name_line, _, data_line = block.partition("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: "), block
        name = name_line[len("event: "):]
        if not out or out[-1][0] != name:
            out.append((name, shape(json.loads(data_line[len("data: "):]))))
    return out


def assert_same_body(capture: Capture, response: requests.Response) -> None:
    content_type = response.headers.get("Content-Type", "")
    if content_type.startswith("text/event-stream") and capture.body.startswith("event: "):
        assert named_events(response.text) == named_events(capture.body)
    elif content_type.startswith("text/event-stream"):
        want, got = sse_events(capture.body), sse_events(response.text)
        assert (want[-1] == "data: [DONE]") == (got[-1] == "data: [DONE]")
        payload_want = [e for e in want if e != "data: [DONE]"]
        payload_got = [e for e in got if e != "data: [DONE]"]
        assert shape(event_json(payload_got[0])) == shape(event_json(payload_want[0]))
        try:
            last_want = event_json(payload_want[-1])
        except ValueError:  # a few captures were cut short; their first events still count
            last_want = None
        if last_want is not None:
            assert shape(event_json(payload_got[-1])) == shape(last_want)
        for block in got:
            assert block.startswith("data: ")
    elif content_type.startswith("application/json"):
        try:
            want = json.loads(capture.body)
        except ValueError:  # a capture cut short: its keys, in order, must open our answer
            keys = re.findall(r'"([A-Za-z_.]+)":', capture.body)
            assert re.findall(r'"([A-Za-z_.]+)":', response.text)[:len(keys)] == keys
            return
        assert shape(response.json()) == shape(want)
    elif content_type.startswith("text/plain"):
        def series(text: str) -> list[str]:
            return [line.rsplit(" ", 1)[0] for line in text.splitlines() if line]
        assert series(response.text) == series(capture.body)
    else:
        assert response.text == capture.body.strip("\n")


CHAT = {"model": "x", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 16}
SAME_REQUESTS = [
    # (capture, simulator flags, method, path, headers, json body): replayed against each build's
    # capture of that name
    ("01-health-idle.txt", [], "GET", "/health", {}, None),
    ("02-slots-idle.txt", [], "GET", "/slots", {}, None),
    ("03-props.txt", [], "GET", "/props", {}, None),
    ("04-metrics-idle.txt", [], "GET", "/metrics", {}, None),
    ("05-v1-models.txt", [], "GET", "/v1/models", {}, None),
    ("05b-models.txt", [], "GET", "/models", {}, None),
    ("06-completion-nonstream.txt", [], "POST", "/completion", {}, {"prompt": "Hello, my name is", "n_predict": 16}),
    ("07-completion-stream.txt", [], "POST", "/completion", {},
     {"prompt": "Hello, my name is", "n_predict": 16, "stream": True}),
    ("08-chat-nonstream.txt", [], "POST", "/v1/chat/completions", {},
     {"model": "x", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 16}),
    ("09-chat-stream.txt", [], "POST", "/v1/chat/completions", {},
     {"model": "x", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 16, "stream": True}),
    ("10-v1-completions.txt", [], "POST", "/v1/completions", {},
     {"model": "x", "prompt": "Once upon a time", "max_tokens": 16}),
    ("10b-v1-completions-stream.txt", [], "POST", "/v1/completions", {},
     {"model": "x", "prompt": "Once upon a time", "max_tokens": 4, "stream": True}),
    ("11-tokenize.txt", [], "POST", "/tokenize", {}, {"content": "Hello world"}),
    ("11c-detokenize.txt", [], "POST", "/detokenize", {}, {"tokens": [15043, 3186]}),
    ("16-unknown-path.txt", [], "GET", "/nonexistent", {}, None),
    ("19-health-v1.txt", [], "GET", "/v1/health", {}, None),
    ("20-props-post-disabled.txt", [], "POST", "/props", {}, {}),
    ("51-apikey-completion-nokey.txt", ["--api-key", "secret"], "POST", "/completion", {}, {"prompt": "x"}),
    ("53-apikey-health-nokey.txt", ["--api-key", "secret"], "GET", "/health", {}, None),
    ("56-apikey-goodkey-stream.txt", ["--api-key", "secret"], "POST", "/completion",
     {"Authorization": "Bearer secret"}, {"prompt": "x", "n_predict": 4, "stream": True}),
]

CASES = [
    *SAME_REQUESTS,
    ("09b-chat-stream-usage.txt", [], "POST", "/v1/chat/completions", {},
     {"model": "x", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "stream": True,
      "stream_options": {"include_usage": True}}),
    ("11b-tokenize-pieces.txt", [], "POST", "/tokenize", {}, {"content": "Hello world", "with_pieces": True}),
    ("12-embedding-no-flag.txt", [], "POST", "/embedding", {}, {"content": "Hello world"}),
    ("12b-v1-embeddings-no-flag.txt", [], "POST", "/v1/embeddings", {}, {"input": "Hello world", "model": "x"}),
    ("15-slots-fail-on-no-slot-idle.txt", [], "GET", "/slots?fail_on_no_slot=1", {}, None),
    ("18-completion-ctx-overflow.txt", [], "POST", "/completion", {}, {"prompt": "hello " * 1500, "n_predict": 4}),
    ("54-apikey-xapikey-header.txt", ["--api-key", "secret"], "POST", "/completion", {"x-api-key": "secret"},
     {"prompt": "x"}),
    ("55-apikey-no-bearer.txt", ["--api-key", "secret"], "POST", "/completion", {"Authorization": "secret"},
     {"prompt": "x"}),
    ("60-noslots-default-slots.txt", ["--no-slots", "--no-metrics"], "GET", "/slots", {}, None),
    ("60-noslots-default-metrics.txt", ["--no-slots", "--no-metrics"], "GET", "/metrics", {}, None),
    ("60-noslots-default-props.txt", ["--no-slots", "--no-metrics"], "GET", "/props", {}, None),
    ("80-embeddings-server-embedding.txt", ["--embeddings"], "POST", "/embedding", {}, {"content": "Hello world"}),
    ("81-embeddings-server-v1-embeddings.txt", ["--embeddings"], "POST", "/v1/embeddings", {},
     {"input": "Hello world", "model": "x"}),
    ("82-embeddings-server-completion.txt", ["--embeddings"], "POST", "/completion", {}, {"prompt": "x"}),
]


MODERN = ["--dialect", "modern", "--build-info", "b0-unknown"]
CASES_2026 = [
    # the 2026 build (tests/captures/2026, recorded by scripts/record_captures.py) against --dialect modern
    *SAME_REQUESTS,
    ("22-responses-nonstream.txt", [], "POST", "/v1/responses", {},
     {"model": "x", "input": "Say hi", "max_output_tokens": 16}),
    ("22b-responses-stream.txt", [], "POST", "/v1/responses", {},
     {"model": "x", "input": "Say hi", "max_output_tokens": 4, "stream": True}),
    ("23-messages-nonstream.txt", [], "POST", "/v1/messages", {}, CHAT),
    ("23b-messages-stream.txt", [], "POST", "/v1/messages", {}, {**CHAT, "max_tokens": 4, "stream": True}),
    ("24-messages-count-tokens.txt", [], "POST", "/v1/messages/count_tokens", {}, CHAT),
    ("25-chat-input-tokens.txt", [], "POST", "/v1/chat/completions/input_tokens", {}, CHAT),
    ("52-apikey-slots-nokey.txt", ["--api-key", "secret"], "GET", "/slots", {}, None),
    ("60-noslots-slots.txt", ["--no-slots"], "GET", "/slots", {}, None),
]


@pytest.fixture(scope="module")
def simulators(tmp_path_factory: pytest.TempPathFactory):
    """One simulator per flag set, shared by the cases of this module."""
    fleet = Fleet(tmp_path_factory.mktemp("contract"))
    started: dict[tuple[str, ...], str] = {}

    def get(flags: list[str]) -> str:
        key = tuple(flags)
        if key not in started:
            proc = fleet.simulator("--parallel", "4", "--ctx-size", "4096", "--decode-tokens-per-second", "0",
                                   *flags)
            started[key] = proc.url
        return started[key]

    try:
        yield get
    finally:
        fleet.cleanup()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_capture(case: tuple, simulators) -> None:
    replay(case, "", [], simulators)


@pytest.mark.parametrize("case", CASES_2026, ids=[c[0] for c in CASES_2026])
def test_modern_dialect_matches_the_2026_capture(case: tuple, simulators) -> None:
    replay(case, "2026/", MODERN, simulators)


def test_the_2026_slots_after_requests_match(simulators) -> None:
    """A slot that has run a task shows its last task's figures (capture 15 was taken after requests)."""
    base = simulators(MODERN)
    requests.post(base + "/completion", json={"prompt": "hi", "n_predict": 4}, timeout=10)
    want = json.loads(load_capture("2026/15-slots-fail-on-no-slot-idle.txt").body)
    got = requests.get(base + "/slots?fail_on_no_slot=1", timeout=10).json()
    used = [shape(s) for s in want if "id_task" in s]
    assert used and all(shape(s) in (shape(want[0]), used[0]) for s in got)
    assert any(shape(s) == used[0] for s in got)


def replay(case: tuple, folder: str, dialect: list[str], simulators) -> None:
    name, flags, method, path, headers, body = case
    capture = load_capture(folder + name)
    base = simulators([*dialect, *flags])
    response = requests.request(method, base + path, headers=headers,
                                data=None if body is None else json.dumps(body), timeout=10)
    assert f"{response.status_code} {response.reason}" == capture.status
    assert_same_headers(capture.headers, response.headers)
    assert_same_body(capture, response)


def test_bad_json_is_a_500_with_the_parser_message(simulators) -> None:
    capture = load_capture("17-completion-bad-json.txt")
    response = requests.post(simulators([]) + "/completion", data='{"prompt": ', timeout=10)
    assert f"{response.status_code} {response.reason}" == capture.status
    assert_same_headers(capture.headers, response.headers)
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["message"].startswith("[json.exception.parse_error.101]")


def test_options_preflight(simulators) -> None:
    capture = load_capture("21-options-preflight.txt")
    response = requests.options(simulators([]) + "/completion", headers={"Origin": "http://example"}, timeout=10)
    assert f"{response.status_code} {response.reason}" == capture.status
    assert_same_headers(capture.headers, response.headers)


def test_api_key_matrix(simulators) -> None:
    """Every row of capture 50: no key, wrong key, good key."""
    base = simulators(["--api-key", "secret"])
    rows = [line.split() for line in (CAPTURES / "50-apikey-matrix.txt").read_text().splitlines()[2:]]
    for path, method, nokey, wrongkey, goodkey in rows:
        for header, expected in ((None, nokey), ("Bearer wrong", wrongkey), ("Bearer secret", goodkey)):
            headers = {"Authorization": header} if header else {}
            payload = {"prompt": "x", "n_predict": 1, "content": "x", "tokens": [1],
                       "messages": [{"role": "user", "content": "x"}]}
            response = requests.request(method, base + path, headers=headers, timeout=10,
                                        data=json.dumps(payload) if method == "POST" else None)
            assert str(response.status_code) == expected, (path, method, header, response.text)


ROUTER_REQUESTS = [
    # the 2026 build in router mode (recorded in this order by scripts/record_captures.py: the model loads on the way)
    ("90-router-props.txt", "GET", "/props", None),
    ("91-router-models-unloaded.txt", "GET", "/models", None),
    ("92-router-slots-no-model.txt", "GET", "/slots", None),
    ("93-router-completion-no-model.txt", "POST", "/completion", {"prompt": "x", "n_predict": 2}),
    ("94-router-unknown-model.txt", "POST", "/v1/chat/completions", {**CHAT, "model": "nope"}),
    ("95-router-slots-not-loaded.txt", "GET", "/slots?model=tiny&autoload=false", None),
    ("96-router-load.txt", "POST", "/models/load", {"model": "tiny"}),
    ("97-router-models-loaded.txt", "GET", "/models", None),
    ("98-router-slots.txt", "GET", "/slots?model=tiny&autoload=false", None),
    ("99-router-chat.txt", "POST", "/v1/chat/completions", {**CHAT, "model": "tiny"}),
    ("99b-router-props-model.txt", "GET", "/props?model=tiny&autoload=false", None),
    ("99c-router-unload.txt", "POST", "/models/unload", {"model": "tiny"}),
]


def test_router_mode_matches_the_2026_router_captures(fleet: Fleet) -> None:
    """The simulated router answers each recorded exchange of the real one, in the order recorded."""
    router = fleet.simulator("--parallel", "4", "--ctx-size", "4096", "--decode-tokens-per-second", "0",
                             "--build-info", "b0-unknown", "--router-models", "tiny", "--load-time", "0.2")
    for name, method, path, body in ROUTER_REQUESTS:
        capture = load_capture("2026/" + name)
        response = requests.request(method, router.url + path, data=None if body is None else json.dumps(body),
                                    timeout=10)
        assert f"{response.status_code} {response.reason}" == capture.status, name
        assert_same_headers(capture.headers, response.headers)
        assert_same_body(capture, response)
        if name == "96-router-load.txt":  # loading takes --load-time; the recording waited for it too
            deadline = time.monotonic() + 5
            while '"loaded"' not in requests.get(router.url + "/models", timeout=5).text:
                assert time.monotonic() < deadline, "the simulated router never finished loading"
                time.sleep(0.05)
