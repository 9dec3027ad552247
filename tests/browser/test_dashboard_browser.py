"""The web dashboard in a real headless Chromium (Debian's), driven by Playwright; screenshots in test-artifacts/."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.helpers import PADDLER_SYNC, ROOT, Fleet, agents, wait_until

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                                          "(scripts/system-packages.sh installs it)")]


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Iterator:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.dialogs = dialogs
    yield page
    context.close()


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"dashboard-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def test_page_is_server_rendered_with_a_loading_state(fleet: Fleet) -> None:
    balancer = fleet.balancer("--management-dashboard-enable")
    html = requests.get(balancer.extra["management"] + "/dashboard", timeout=5).text
    assert "Loading agents..." in html and "/dashboard/fleet" in html


def test_empty_then_a_row_appears_then_numbers_move(fleet: Fleet, page) -> None:
    balancer = fleet.balancer("--management-dashboard-enable")
    page.goto(balancer.extra["management"] + "/dashboard")
    page.wait_for_selector("#no-agents", timeout=10_000)
    assert "No agents registered yet" in page.inner_text("#no-agents")
    shot(page, "empty")

    sim = fleet.simulator("--parallel", "3", "--decode-tokens-per-second", "20")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "gpu-1", interval=0.2)
    page.wait_for_selector("tr.agent", timeout=10_000)
    row = page.locator("tr.agent")
    assert row.locator(".name").inner_text() == "gpu-1"
    assert row.locator(".idle").inner_text() == "3" and row.locator(".processing").inner_text() == "0"
    assert row.locator(".models").inner_text() == "models/simulated.gguf 3/3 free"
    assert page.inner_text("#models tr.model .name") == "models/simulated.gguf"

    streams = [requests.post(balancer.extra["proxy"] + "/completion", stream=True, timeout=10,
                             json={"prompt": "x", "n_predict": 100, "stream": True}) for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:  # three more wait in the balancer's queue, one naming no model
        waiting = [pool.submit(requests.post, balancer.extra["proxy"] + "/completion", timeout=20,
                               json={"model": "simulated", "prompt": "x", "n_predict": 4}) for _ in range(2)]
        waiting.append(pool.submit(requests.post, balancer.extra["proxy"] + "/completion", timeout=20,
                                   json={"prompt": "x", "n_predict": 4}))
        page.wait_for_function("document.querySelector('#buffered').innerText === '3'", timeout=10_000)
        assert row.locator(".in-flight").inner_text() == "3" and page.inner_text("#total-in-flight") == "3"
        assert page.inner_text("#models tr.model .waiting") == "2"  # they name the model (its file's name)
        assert page.inner_text("#models tr.unnamed .waiting") == "1"  # every waiting request is counted somewhere
        # the legend's peak is the peak of waiting requests, not the chart's scale
        page.wait_for_function("document.querySelector('.legend').innerText.includes('requests waiting (peak 3)')",
                               timeout=10_000)
        shot(page, "under-load")
        for stream in streams:
            stream.close()
        assert [w.result().status_code for w in waiting] == [200, 200, 200]
    page.wait_for_function("document.querySelector('tr.agent .processing').innerText === '0'", timeout=10_000)
    # the three streams their clients cut show as errors by kind; the two served ones as tokens
    page.wait_for_function("document.querySelector('#fleet-errors').innerText.includes('client_gone 3')",
                           timeout=10_000)
    assert float(page.inner_text("#fleet-tps-mean")) > 0 and float(row.locator(".rps").inner_text()) > 0
    assert "mean over 5 min" in page.inner_text("section[aria-label='Traffic over the range']")
    assert page.inner_text("#fleet-wait") != "-"
    y_ticks = page.locator("figure.chart").first.locator(".y-tick").all_text_contents()
    assert y_ticks[0] == "0" and len(y_ticks) == 3 and float(y_ticks[-1]) >= 3  # at least the 3 slots in all
    x_ticks = page.locator("figure.chart").first.locator(".x-tick").all_text_contents()
    assert len(x_ticks) == 4 and all(re.fullmatch(r"\d\d:\d\d:\d\d", t) for t in x_ticks)
    # slots in use is drawn over slots in all: a full fleet shows its slots in use, not the total's dashes
    keys = page.locator("figure.chart").first.locator("path.series").evaluate_all("ps => ps.map(p => p.dataset.key)")
    assert keys.index("slots_busy") > keys.index("slots_total")
    page.click("button[data-range='1h']")
    page.wait_for_function("document.querySelector('section[aria-label=History] h2').innerText.includes('hour')",
                           timeout=10_000)
    assert page.get_attribute("button[data-range='1h']", "aria-pressed") == "true"
    shot(page, "one-hour")


def test_an_agent_in_error_shows_its_hint_and_names_render_as_text(fleet: Fleet, page) -> None:
    balancer = fleet.balancer("--management-dashboard-enable")
    locked = fleet.simulator("--api-key", "secret")
    fleet.agent(locked.port, balancer.extra["management_port"], "--name", "<script>alert(1)</script>", interval=0.2)
    no_slots = fleet.simulator("--no-slots")
    fleet.agent(no_slots.port, balancer.extra["management_port"], "--name", "noslots", interval=0.2)
    long_error = "x" * 400  # an agent may send a long error text: it wraps in its cell, whole behind "more"
    requests.post(balancer.extra["management"] + "/api/v1/agents/long-error/report", timeout=5, json={
        "agent_name": "talkative", "error": long_error, "external_llamacpp_addr": "127.0.0.1:9",
        "is_authorized": None, "is_slots_endpoint_enabled": None, "slots_idle": 0, "slots_processing": 0,
        "state": "unreachable", "monitoring_interval": 60}).raise_for_status()
    wait_until(lambda: len(agents(balancer)) == 3 and all(a["state"] != "ready" for a in agents(balancer)))
    page.goto(balancer.extra["management"] + "/dashboard")
    page.wait_for_selector("tr.agent.has-issues", timeout=10_000)
    page.wait_for_timeout(1500)  # let the page refresh a couple of times: a script would have run by now
    text = page.inner_text("#agents")
    assert "--llamacpp-api-key" in text and "start llama-server with --slots" in text
    assert "<script>alert(1)</script>" in text  # shown as text...
    assert page.dialogs == []  # ...never run
    panel = page.locator("section[aria-label='Registered agents']")
    assert panel.evaluate("p => p.scrollWidth <= p.clientWidth"), "a long error text widened the table"
    page.click("details.issue summary")
    page.wait_for_timeout(1200)  # an opened text stays open across refreshes
    assert page.locator("details.issue[open]").count() == 1 and long_error in page.inner_text("details.issue")
    shot(page, "errors")


def test_cannot_reach_the_management_server(fleet: Fleet, page) -> None:
    balancer = fleet.balancer("--management-dashboard-enable")
    page.goto(balancer.extra["management"] + "/dashboard")
    page.wait_for_selector("#no-agents", timeout=10_000)
    balancer.kill()
    page.wait_for_selector("#unreachable:not(.hidden)", timeout=10_000)
    assert "Cannot reach the management server" in page.inner_text("#unreachable")
    shot(page, "unreachable")


def test_fits_a_phone_screen(fleet: Fleet, browser) -> None:
    balancer = fleet.balancer("--management-dashboard-enable")
    sim = fleet.simulator("--parallel", "2")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "phone-test", interval=0.2)
    context = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True)
    page = context.new_page()
    try:
        page.goto(balancer.extra["management"] + "/dashboard")
        page.wait_for_selector("tr.agent", timeout=10_000)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways on a phone ({width}px)"
        shot(page, "phone")
    finally:
        context.close()


def test_change_a_servers_model_with_confirmation_and_watch_it_swap(fleet: Fleet, page) -> None:
    for name in ("tiny.gguf", "slow.gguf"):
        (fleet.workdir / name).touch()
    balancer = fleet.balancer("--management-dashboard-enable", "--management-token", "secret")
    fleet.supervised(balancer.extra["management_port"], PADDLER_SYNC, "simulate", "-m",
                     str(fleet.workdir / "tiny.gguf"), "--startup-time", "1.5", name="gpu-1",
                     agent_args=("--management-token", "secret"))
    page.goto(balancer.extra["management"] + "/dashboard?token=secret")
    page.wait_for_selector("tr.agent .supervisor", timeout=20_000)
    page.wait_for_function("document.querySelector('tr.agent .supervisor').textContent.includes('ready')",
                           timeout=20_000)
    page.click("button.change-model")
    assert page.input_value("#swap-model").endswith("tiny.gguf")  # the model it runs now
    page.fill("#swap-model", str(fleet.workdir / "slow.gguf"))
    page.click("#swap-go")
    assert page.is_visible("#swap-confirm") and "slow.gguf" in page.inner_text("#swap-what")
    shot(page, "swap-confirm")
    page.click("#swap-go")  # confirmed
    page.wait_for_selector("#swap", state="hidden", timeout=5_000)
    page.wait_for_function("/starting|loading|restarting/.test(document.querySelector('tr.agent .supervisor')"
                           ".textContent)", timeout=10_000)  # progress shows while it swaps
    shot(page, "swap-progress")
    page.wait_for_function("document.querySelector('tr.agent .models').textContent.includes('slow.gguf')",
                           timeout=20_000)

    page.click("button.drain-toggle")
    page.wait_for_function("document.querySelector('button.drain-toggle').textContent === 'Undrain'", timeout=5_000)
    assert "draining" in page.inner_text("tr.agent .issues")
    page.click("button.drain-toggle")
    page.wait_for_function("document.querySelector('button.drain-toggle').textContent === 'Drain'", timeout=5_000)
    assert page.dialogs == []  # no error was alerted


def test_the_tenants_table_shows_use_and_no_key(fleet: Fleet, page) -> None:
    tenants = fleet.workdir / "tenants.toml"
    tenants.write_text('[tenants.chat]\nkeys = ["sk-chat-secret-0001"]\npriority = 10\nreserved_slots = 1\n\n'
                       '[tenants.batch]\nkey_sha256 = ["' + "ab" * 32 + '"]\nmax_slots = 2\n')
    balancer = fleet.balancer("--management-dashboard-enable", "--tenants", str(tenants))
    sim = fleet.simulator("--parallel", "2")
    fleet.agent(sim.port, balancer.extra["management_port"], "--name", "one", interval=0.2)
    wait_until(lambda: agents(balancer) and agents(balancer)[0]["state"] == "ready")
    answer = requests.post(balancer.extra["proxy"] + "/completion", json={"prompt": "hi", "n_predict": 7},
                           headers={"Authorization": "Bearer sk-chat-secret-0001"}, timeout=10)
    assert answer.status_code == 200
    page.goto(balancer.extra["management"] + "/dashboard")
    chat = page.locator('#tenants tr[data-tenant="chat"]')
    chat.locator(".served", has_text="1").wait_for(timeout=10_000)
    assert re.fullmatch(r"[1-9]\d* / 7 \(\d+\)", chat.locator(".tokens").inner_text())  # in / out (cached)
    assert chat.locator(".keys").inner_text() == "sk-chat-…"
    assert page.locator('#tenants tr[data-tenant="batch"] .keys').inner_text() == "1 hashed"
    assert page.locator('#tenants tr[data-tenant="batch"] .slots').inner_text() == "0 / 2"
    assert "sk-chat-secret" not in page.content()
    shot(page, "tenants")
