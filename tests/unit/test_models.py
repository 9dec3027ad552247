"""Model names, the reports' pools, what a request asks, the context judgement and the ledger's choice by model:
the pure parts of model routing, with no process started."""

from __future__ import annotations

import json

import pytest

from paddler_sync.ledger.ledger import Ledger
from paddler_sync.protocol.models import ANY, LOADED, UNLOADED, Serving, names_for
from paddler_sync.protocol.reports import AgentReport, ModelReport, ReportError, parse_report
from paddler_sync.proxy.ask import BadAsk, Fit, judge, read_ask
from tests.helpers import good_report


def test_a_path_answers_to_its_file_name_with_and_without_gguf_and_case_does_not_matter() -> None:
    names = names_for(["/srv/models/Qwen3-8B.gguf", "Chat", None, " "])
    assert names == {"/srv/models/qwen3-8b.gguf", "qwen3-8b.gguf", "qwen3-8b", "chat"}
    serving = Serving("chat", names)
    assert serving.serves("qwen3-8b") and serving.serves("chat")
    assert not serving.serves("qwen3") and not serving.serves("8b") and not serving.serves("models")


def test_who_serves_a_request_that_names_no_model() -> None:
    assert Serving("tiny", frozenset({"tiny"})).serves(None)  # a single-model server takes any request
    assert not Serving("tiny", frozenset({"tiny"}), needs_model=True).serves(None)  # a router needs the name
    assert ANY.serves(None) and ANY.serves("whatever")  # an agent that could not tell its model
    assert not Serving(needs_model=True).serves("whatever")


def test_serving_survives_the_shared_store_and_garbage_serves_anything() -> None:
    serving = Serving("tiny", frozenset({"tiny", "t"}), needs_model=True, state=UNLOADED, n_ctx=1024, loadable=True)
    assert Serving.from_json(serving.to_json()) == serving
    assert Serving.from_json("not json") == ANY and Serving.from_json("") == ANY


def router_report(**changes: object) -> AgentReport:
    body = good_report(**{"router": True, "models_autoload": True, "slots_idle": 3, "slots_processing": 1,
                          "total_slots": 4, "models": [
                              {"id": "tiny", "aliases": ["fast"], "status": "loaded", "slots_idle": 3,
                               "slots_processing": 1, "n_ctx": 1024},
                              {"id": "slow", "status": "unloaded"}, {"id": "big", "status": "loading"}],
                          **changes})
    return parse_report(json.dumps(body).encode())


def test_a_router_report_makes_one_pool_per_model() -> None:
    pools = {p.key: p for p in router_report().entries("a1", autoload=True)}
    assert set(pools) == {"a1/tiny", "a1/slow", "a1/big"}
    tiny, slow, big = pools["a1/tiny"], pools["a1/slow"], pools["a1/big"]
    assert (tiny.total, tiny.processing, tiny.routable) == (4, 1, True)
    assert tiny.serving.names == {"tiny", "fast"} and tiny.serving.needs_model and tiny.serving.n_ctx == 1024
    assert (slow.total, slow.routable, slow.serving.loadable) == (1, True, True)  # one request may load it
    assert (big.total, big.routable) == (0, False)  # loading: nothing goes there until it is loaded
    no_autoload = {p.key: p for p in router_report().entries("a1", autoload=False)}
    assert (no_autoload["a1/slow"].total, no_autoload["a1/slow"].routable) == (0, False)
    server_says_no = {p.key: p for p in router_report(models_autoload=False).entries("a1", autoload=True)}
    assert server_says_no["a1/slow"].total == 0


def test_a_single_model_report_keeps_the_agent_id_as_its_key() -> None:
    report = parse_report(json.dumps(good_report(models=[
        {"id": "chat", "aliases": ["chat", "assistant"], "path": "/m/tiny.gguf", "slots_idle": 4, "n_ctx": 512}],
    )).encode())
    [pool] = report.entries("a1", autoload=True)
    assert pool.key == "a1" and pool.total == 4 and pool.serving.names >= {"chat", "assistant", "tiny"}
    [unknown] = parse_report(json.dumps(good_report()).encode()).entries("a1", autoload=True)
    assert unknown.serving == ANY


@pytest.mark.parametrize("models,reason", [
    ([{"id": "a"}, {"id": "b"}], "not in router mode"),
    ([{"id": ""}], "non-empty id"),
    ([{"id": "a", "status": "sleepy"}], "status must be one of"),
    ([{"id": "a", "n_ctx": 0}], "n_ctx"),
    ([{"id": "a", "colour": "red"}], "unknown model fields"),
    ([{"id": "a", "aliases": [1]}], "aliases"),
    ("tiny", "list"),
])
def test_bad_model_lists_are_refused_with_a_reason(models: object, reason: str) -> None:
    with pytest.raises(ReportError, match=reason):
        parse_report(json.dumps(good_report(models=models)).encode())
    with pytest.raises(ReportError, match="appears twice"):
        parse_report(json.dumps(good_report(router=True, slots_idle=0, slots_processing=0, total_slots=0,
                                            models=[{"id": "a", "status": "unloaded"}] * 2)).encode())


def test_a_router_whose_models_do_not_add_up_is_refused() -> None:
    with pytest.raises(ReportError, match="sum of its models"):
        router_report(slots_idle=4, slots_processing=0, total_slots=4)
    with pytest.raises(ReportError, match="not loaded cannot have slots"):
        parse_report(json.dumps(good_report(router=True, slots_idle=1, slots_processing=0, total_slots=1, models=[
            {"id": "x", "status": "unloaded", "slots_idle": 1}])).encode())


def test_a_report_survives_its_json_round_trip() -> None:
    report = router_report()
    assert AgentReport.from_json(json.loads(json.dumps(report.to_json()))) == report
    assert isinstance(report.models[0], ModelReport)


def test_the_model_comes_from_the_body_of_a_post_and_the_query_of_a_get() -> None:
    ask = read_ask("POST", "", json.dumps({"model": " Tiny ", "messages": [
        {"role": "user", "content": "héllo"}, {"role": "user", "content": [{"type": "text", "text": "abc"}]}],
        "max_tokens": 7}).encode())
    assert (ask.named, ask.model, ask.limit, ask.prompt_bytes, ask.messages) == (" Tiny ", "tiny", 7, 9, 2)
    assert read_ask("GET", "model=slow&x=1", b"").model == "slow"
    assert read_ask("GET", "", b"").model is None
    assert read_ask("POST", "", b"not json").model is None  # llama.cpp answers that one itself
    ids = read_ask("POST", "", b'{"prompt": [1, 2, 3, "ab"], "n_predict": -1}')
    assert (ids.prompt_ids, ids.prompt_bytes, ids.limit) == (3, 2, None)
    with pytest.raises(BadAsk, match="must be a string"):
        read_ask("POST", "", b'{"model": 3}')


def test_the_context_judgement_is_safe_on_both_sides() -> None:
    small = read_ask("POST", "", json.dumps({"prompt": "x" * 100, "n_predict": 100}).encode())
    assert judge(small, 1024).fit is Fit.FITS and judge(small, 1024).need == 100 + 16 + 100
    huge = read_ask("POST", "", json.dumps({"prompt": "x" * 40_000, "n_predict": 10}).encode())
    assert judge(huge, 1024).fit is Fit.TOO_BIG  # even 32 bytes a token would not fit
    near = read_ask("POST", "", json.dumps({"prompt": "hello " * 300, "n_predict": 100}).encode())
    assert judge(near, 1024).fit is Fit.COUNT  # 1800 bytes: anywhere from 56 to 1800 tokens
    roomy = read_ask("POST", "", json.dumps({"prompt": "hello " * 300, "n_predict": 100}).encode())
    assert judge(roomy, 8192).fit is Fit.FITS


def pool(ledger: Ledger, key: str, serving: Serving, total: int = 2, processing: int = 0,
         routable: bool = True) -> None:
    ledger.report(key, f"127.0.0.1:{9000 + len(list(ledger.upstreams()))}", total, processing, routable,
                  serving=serving)


def test_the_ledger_sends_a_model_only_where_it_is_served() -> None:
    ledger = Ledger(clock=lambda: 100.0)
    pool(ledger, "a", Serving("tiny", frozenset({"tiny"})), total=1)
    pool(ledger, "b", Serving("slow", frozenset({"slow"})), total=1)
    first = ledger.reserve(model="tiny")
    assert first is not None and first.upstream.key == "a"
    assert ledger.reserve(model="tiny") is None  # b has room, but not for tiny
    assert ledger.reserve(model="nope") is None
    assert ledger.knows("slow") and not ledger.knows("nope")
    other = ledger.reserve()  # naming none: any single-model server
    assert other is not None and other.upstream.key == "b"


def test_a_loaded_model_is_preferred_and_a_cold_one_loads_only_when_loaded_nowhere() -> None:
    ledger = Ledger(clock=lambda: 100.0)
    names = frozenset({"tiny"})
    pool(ledger, "r1/tiny", Serving("tiny", names, needs_model=True, state=UNLOADED, loadable=True), total=1)
    pool(ledger, "r2/tiny", Serving("tiny", names, needs_model=True, state=LOADED), total=1)
    taken = ledger.reserve(model="tiny")
    assert taken is not None and taken.upstream.key == "r2/tiny" and not taken.loads_model
    assert ledger.reserve(model="tiny") is None  # loaded on r2 and full: wait, do not load a second copy
    ledger.remove("r2/tiny")
    load = ledger.reserve(model="tiny")
    assert load is not None and load.upstream.key == "r1/tiny" and load.loads_model
    assert ledger.reserve(model="tiny") is None  # one request loads it; the others wait for its slots
    assert ledger.reserve() is None  # a router never gets a request that names no model


def test_a_request_goes_only_where_its_context_fits() -> None:
    ledger = Ledger(clock=lambda: 100.0)
    pool(ledger, "small", Serving("m", frozenset({"m"}), n_ctx=512))
    pool(ledger, "large", Serving("m", frozenset({"m"}), n_ctx=4096))
    for _ in range(2):
        taken = ledger.reserve(model="m", need=1000)
        assert taken is not None and taken.upstream.key == "large"
    assert ledger.reserve(model="m", need=1000) is None
    assert ledger.reserve(model="m", need=100) is not None


def test_a_server_that_stops_saying_what_it_serves_keeps_its_models_known_but_takes_nothing() -> None:
    from paddler_sync.fleet.registry import Registry

    ledger = Ledger(clock=lambda: 100.0)
    registry = Registry(ledger, clock=lambda: 100.0)
    registry.apply("r1", router_report())
    registry.apply("s1", parse_report(json.dumps(good_report(external_llamacpp_addr="127.0.0.1:9002", models=[
        {"id": "chat", "slots_idle": 3, "slots_processing": 1}])).encode()))
    assert ledger.knows("tiny") and ledger.knows("chat")
    for agent_id, addr in (("r1", "127.0.0.1:9001"), ("s1", "127.0.0.1:9002")):  # llama.cpp unreachable a moment
        registry.apply(agent_id, parse_report(json.dumps(good_report(
            external_llamacpp_addr=addr, state="unreachable", slots_idle=0, slots_processing=0, total_slots=None,
            is_authorized=None, is_slots_endpoint_enabled=None, router=agent_id == "r1")).encode()))
    assert ledger.knows("tiny") and ledger.knows("chat") and not ledger.knows("other")  # no 404 meanwhile
    assert ledger.reserve(model="tiny") is None and ledger.reserve(model="chat") is None  # and nothing goes there
