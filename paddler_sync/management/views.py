"""The management API's documents that are not the fleet's status (that is paddler_sync/fleet/status.py)."""

from __future__ import annotations

import time
from typing import Any

from paddler_sync.fleet.status import FleetStatus
from paddler_sync.traffic import RANGES, Traffic


def traffic_json(traffic: Traffic, status: FleetStatus, range_name: str) -> dict[str, Any]:
    """What went through this balancer over the range: the fleet, each server (named by its agent), a series."""
    now = time.time()
    summary = traffic.summary(range_name, now)
    names = status.agent_names()
    seconds, step = RANGES[range_name]
    return {
        "range": range_name,
        "range_seconds": seconds,
        "step_seconds": step,
        "time_zone": "UTC",
        "now": now,
        "fleet": summary["fleet"],
        "servers": [{"addr": addr, "agent_name": names.get(addr), **figures}
                    for addr, figures in sorted(summary["servers"].items())],
        "series": traffic.series(range_name, now),
    }
