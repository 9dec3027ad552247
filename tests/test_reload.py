"""A reload under streaming load drops nothing: SIGHUP to the balancer (gunicorn's master) starts new workers with
the settings read again, the old worker hands its waiting requests to them and finishes its streams, and no request
waits inside llama.cpp meanwhile; a settings mistake keeps the running worker. On both stores."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from tests.helpers import INTERVAL, Fleet, Proc, agents, sim_stats, streaming_load, wait_until

pytestmark = pytest.mark.both_stores


def loaded_fleet(fleet: Fleet, *balancer_args: str) -> tuple[Proc, list[Proc]]:
    balancer = fleet.balancer("--buffered-request-timeout", "30", *balancer_args)
    sims = [fleet.simulator("--parallel", "2", "--decode-tokens-per-second", "60") for _ in range(2)]
    for i, sim in enumerate(sims):
        fleet.agent(sim.port, balancer.extra["management_port"], "--name", f"s{i}", interval=INTERVAL)
    wait_until(lambda: len(agents(balancer)) == 2 and all(a["state"] == "ready" for a in agents(balancer)))
    return balancer, sims


def workers_booted(balancer: Proc) -> int:
    return len(re.findall(r"Booting worker with pid", balancer.log()))


def test_a_reload_under_streaming_load_fails_no_request(fleet: Fleet) -> None:
    balancer, sims = loaded_fleet(fleet)
    with streaming_load(balancer, 8) as outcomes:  # four slots: four stream, four wait in the buffer
        wait_until(lambda: len(outcomes) >= 8, timeout=20, message="the load running")
        balancer.signal(signal.SIGHUP)
        wait_until(lambda: workers_booted(balancer) == 2, message="the new worker")
        wait_until(lambda: "handed over to them" in balancer.log(), message="the old worker's hand-over")
        before = len(outcomes)
        wait_until(lambda: len(outcomes) >= before + 16, timeout=30, message="the new worker serving")
    assert outcomes and set(outcomes) == {"ok"}, [o for o in outcomes if o != "ok"][:3]
    assert [sim_stats(s)["requests_deferred_total"] for s in sims] == [0, 0]  # nothing queued inside llama.cpp
    handed = int(re.search(r"replaced by new workers: (\d+) waiting request", balancer.log()).group(1))
    assert handed >= 1 and "Traceback" not in balancer.log() and balancer.alive()


def test_a_reload_with_a_settings_mistake_keeps_the_running_worker(fleet: Fleet) -> None:
    tenants = Path(fleet.workdir) / "tenants.toml"
    tenants.write_text('[tenants.a]\nkeys = ["sk-a"]\n')
    balancer, _ = loaded_fleet(fleet, "--tenants", str(tenants))
    tenants.write_text('[tenants.a]\nkeys = ["sk-a"]\nmax_slot = 1\n')
    balancer.signal(signal.SIGHUP)
    wait_until(lambda: "not reloaded, the settings have a mistake" in balancer.log(), message="the refusal")
    log = balancer.log()
    assert "line 3: tenant 'a': unknown field 'max_slot'; did you mean 'max_slots'?" in log
    assert "Hang up" not in log and workers_booted(balancer) == 1 and balancer.alive()  # gunicorn's reload never ran
