"""The tenants file and the rate windows, pure: what each mistake says (with its line), how keys are found, and
how a sliding minute admits and says when to come back."""

from __future__ import annotations

import hashlib

import pytest

from paddler_sync.tenants.book import TenantsError, parse_tenants
from paddler_sync.tenants.rates import LocalRates
from paddler_sync.tenants.rule import Load, Share, Verdict, admits, rank

GOOD = """
[tenants.chat]
keys = ["sk-chat-0001"]
priority = 10
reserved_slots = 1

[tenants.batch]
key_sha256 = ["{digest}"]
weight = 2.5
models = ["Llama-*", "qwen"]

[tenants.anonymous]
max_slots = 1
""".format(digest=hashlib.sha256(b"sk-batch").hexdigest())


def test_a_good_file_identifies_keys_clear_or_hashed() -> None:
    book = parse_tenants(GOOD, "t.toml")
    assert book.identify("sk-chat-0001").name == "chat"  # type: ignore[union-attr]
    assert book.identify("sk-batch").name == "batch"  # type: ignore[union-attr]
    assert book.identify(None).name == "anonymous"  # type: ignore[union-attr]
    assert book.identify("sk-chat-0002") is None
    batch = book.tenants["batch"]
    assert batch.share == Share("batch", 0, 2.5, 0, 0) and batch.may_use("llama-3-8b") and not batch.may_use("phi")
    assert book.tenants["chat"].describe()["key_prefixes"] == ["sk-chat-…"]
    assert book.tenants["batch"].describe()["key_prefixes"] == []  # a hashed key shows nothing
    assert [s.name for s in book.shares_for("phi")] == ["chat", "anonymous"]


@pytest.mark.parametrize(("text", "message"), [
    ("[tenants.a]\nkeys = [\"k\"]\nprority = 1\n", "t.toml, line 3: tenant 'a': unknown field 'prority'; did you mean "
                                                   "'priority'?"),
    ("[tenants.a]\npriority = 1\n", "t.toml, line 1: tenant 'a': no key"),
    ("[tenants.a]\nkeys = [\"k\"]\n\n[tenants.b]\nkeys = [\"k\"]\n", "line 5: tenant 'b' has a key of tenant 'a'"),
    ("[tenants.a]\nkeys = [\"k\"]\nweight = 0\n", "line 3: tenant 'a': weight must be a number above 0"),
    ("[tenants.a]\nkeys = [\"k\"]\nmax_slots = 1\nreserved_slots = 2\n", "line 4: tenant 'a': reserved_slots (2) is "
                                                                        "more than max_slots (1)"),
    ("[tenants.a]\nkey_sha256 = [\"abc\"]\n", "line 2: tenant 'a': key_sha256 holds SHA-256 digests"),
    ("[tenants.anonymous]\nkeys = [\"k\"]\n", "the anonymous tenant serves requests that carry no key"),
    ("[tenants.a]\nkeys = [\"k\"\n", "t.toml: not valid TOML"),
    ("[tenant.a]\nkeys = [\"k\"]\n", "t.toml, line 1: unknown table or key 'tenant'"),
    ("[tenants.\"a b\"]\nkeys = [\"k\"]\n", "tenant 'a b': a tenant's name is 1 to 64 letters"),
    ("", "t.toml: no tenant"),
])
def test_each_mistake_names_its_line_and_fix(text: str, message: str) -> None:
    with pytest.raises(TenantsError) as error:
        parse_tenants(text, "t.toml")
    assert message in str(error.value)


def test_the_rule_caps_keeps_reservations_and_ranks() -> None:
    chat, batch = Share("chat", 10, reserved_slots=1), Share("batch", max_slots=2)
    rivals = (chat, batch)
    assert admits(batch, {"batch": 2}, 5, rivals) is Verdict.AT_CAP
    assert admits(batch, {"batch": 1}, 1, rivals) is Verdict.RESERVED  # the last free slot is chat's
    assert admits(chat, {"batch": 1}, 1, rivals) is Verdict.MAY
    assert admits(batch, {"batch": 1, "chat": 1}, 1, rivals) is Verdict.MAY  # chat holds its reservation
    assert rank(chat, Load({"chat": 3})) < rank(batch, Load())
    assert rank(Share("x", weight=2), Load({"x": 2})) == rank(Share("y"), Load({"y": 1}))
    assert rank(Share("x"), Load(turns={"x": 7})) > rank(Share("y"), Load(turns={"y": 3}))  # y was served longer ago


def test_a_sliding_minute_admits_counts_and_says_when() -> None:
    now = [120.0]
    rates = LocalRates(lambda: now[0])
    assert [rates.admit("t", 2, 0)[0].retry_after for _ in range(3)] == [0.0, 0.0, 60.0 + 30.0]
    now[0] = 180.0 + 30.0  # half into the next minute: the two of the last minute count as one
    window = rates.admit("t", 2, 0)[0]
    assert window.used == pytest.approx(1.0) and window.retry_after == 0.0
    rates.add_tokens("t", 100)
    tokens = rates.admit("t", 0, 100)
    assert tokens[0].kind == "tokens" and tokens[0].retry_after > 0 and tokens[0].remaining == 0
