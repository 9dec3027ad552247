"""The operator's controls in Redis, shared by every worker and balancer of a fleet (``--state-backend redis://``).

Layout (``PREFIX`` is ``--state-prefix``): hash ``PREFIX:control`` (agent id -> its drain mark and desired
state as JSON; field ``*fleet*`` -> the fleet-wide desired state) and hash ``PREFIX:control:grants`` (agents
applying a desired state now; ``paddler_sync/fleet/lua/grant.lua`` hands them out atomically).
"""

from __future__ import annotations

import json
import logging

from paddler_sync.fleet.rollout import AgentControl
from paddler_sync.ledger.stores.redis.store import RedisStore
from paddler_sync.protocol.supervision import DesiredState, SupervisionError, parse_desired, parse_drain

logger = logging.getLogger("paddler_sync.shared")
FLEET_FIELD = "*fleet*"  # agent ids cannot hold '*'


class RedisControls:
    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self.key = f"{store.prefix}:control"
        self.grants_key = f"{store.prefix}:control:grants"

    def agent(self, agent_id: str) -> AgentControl:
        raw = self.store._guarded(self.store.client.hget, self.key, agent_id)
        if raw is None:
            return AgentControl()
        try:
            body = json.loads(raw)
            desired = body.get("desired")
            return AgentControl(parse_drain(body.get("drain")) or AgentControl().drain,
                                None if desired is None else parse_desired(desired))
        except (ValueError, SupervisionError, AttributeError):
            logger.warning("ignored an unreadable control of agent %s in the shared store", agent_id)
            return AgentControl()

    def set_agent(self, agent_id: str, control: AgentControl) -> None:
        body = {"drain": control.drain.to_json(),
                "desired": control.desired.to_json() if control.desired else None}
        self.store._guarded(self.store.client.hset, self.key, agent_id, json.dumps(body))

    def fleet(self) -> DesiredState | None:
        raw = self.store._guarded(self.store.client.hget, self.key, FLEET_FIELD)
        try:
            return None if raw is None else parse_desired(json.loads(raw))
        except (ValueError, SupervisionError):
            logger.warning("ignored an unreadable fleet-wide desired state in the shared store")
            return None

    def set_fleet(self, desired: DesiredState) -> None:
        self.store._guarded(self.store.client.hset, self.key, FLEET_FIELD, json.dumps(desired.to_json()))

    def grant(self, agent_id: str, desired_id: str, limit: int | None, busy: set[str], now: float,
              ttl: float) -> bool:
        args = [agent_id, desired_id, -1 if limit is None else limit, now, ttl, *sorted(busy)]
        return bool(self.store.call("grant", [self.grants_key], args, package=__package__))

    def release(self, agent_id: str) -> None:
        self.store._guarded(self.store.client.hdel, self.grants_key, agent_id)

    def forget(self, agent_id: str) -> None:
        self.store._guarded(self.store.client.hdel, self.key, agent_id)
        self.release(agent_id)

    def granted(self, now: float) -> dict[str, str]:
        grants = self.store._guarded(self.store.client.hgetall, self.grants_key)
        found = {}
        for agent_id, value in grants.items():
            expires, _, desired_id = value.partition("|")
            if float(expires) > now:
                found[agent_id] = desired_id
        return found
