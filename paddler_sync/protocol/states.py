"""The states an agent reports its llama.cpp server in, and the fix an operator reads beside each one (the
dashboards, the agent's log, /api/v1/agents)."""

from __future__ import annotations

import enum


class ServerState(enum.StrEnum):
    READY = "ready"
    UNREACHABLE = "unreachable"
    UNAUTHORIZED = "unauthorized"
    SLOTS_DISABLED = "slots_disabled"
    LOADING = "loading"
    MALFORMED = "malformed"
    UNEXPECTED_STATUS = "unexpected_status"
    BALANCER_PORT = "balancer_port"  # a paddler-sync balancer answered, not llama.cpp


HINTS: dict[ServerState, str] = {
    ServerState.UNREACHABLE: "check that llama-server is running and listening on the agent's "
                             "--local-llamacpp-addr",
    ServerState.UNAUTHORIZED: "llama.cpp wants an API key: pass it to the agent with --llamacpp-api-key=YOURKEY",
    ServerState.SLOTS_DISABLED: "the slots endpoint is off: start llama-server with --slots (builds since "
                                "mid-2025 serve it unless started with --no-slots)",
    ServerState.LOADING: "llama.cpp is still loading its model",
    ServerState.MALFORMED: "llama.cpp's /slots answer could not be read: is this a llama.cpp server?",
    ServerState.UNEXPECTED_STATUS: "llama.cpp answered /slots with an unexpected status",
    ServerState.BALANCER_PORT: "give the agent the llama-server's own address (--local-llamacpp-addr), not the "
                               "balancer's",
}
