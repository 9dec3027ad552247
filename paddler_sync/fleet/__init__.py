"""The fleet's state above the ledger: which agents there are, what the dashboards show, what is being swapped.

    registry        agents and their reports: registration, expiry, one agent per llama.cpp server
    status          the fleet as the API, dashboards and metrics show it
    rollout         a fleet-wide desired state (PUT /api/v1/desired_state), applied a few servers at a time
    redis_controls  the rollout's controls in Redis (lua/grant.lua hands out swap turns atomically)
    shared          the worker's loops around the Redis store: mirror refresh, wake-ups, lease renewal, shared
                    counts and prompt affinity
"""
