"""The scheduling rule between tenants, pure: whose waiting request goes next, and who may take a slot now.

When a slot frees, among the requests waiting for it: the highest ``priority`` first; within a priority, the
tenant holding the fewest slots per unit of ``weight``; between tenants that tie, the one whose last slot was
taken longest ago (so a tie does not always go to the tenant with the longest queue: with three slots and two
tenants, each gets the odd slot in turn); first come, first served within a tenant. A tenant at its
``max_slots`` waits. ``reserved_slots`` are kept fleet-wide: a tenant may take a slot only if the slots still free
after it cover what every other tenant (that may use those servers) holds short of its reservation. No running
generation is ever cut to make room: the rule only decides who gets the next free slot.

The in-process store applies :func:`admits` in Python, the Redis store in ``take.lua`` (the same arithmetic, atomic
with the take across every worker and balancer); ``tests/live/test_tenant_rule.py`` holds both to the same decisions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum


@dataclass(frozen=True)
class Share:
    """What the rule needs of a tenant (the tenants file's fields of the same names)."""

    name: str
    priority: int = 0
    weight: float = 1.0
    reserved_slots: int = 0
    max_slots: int = 0  # 0: no cap


class Verdict(IntEnum):
    """Whether a tenant may take a slot now (the Redis store's take.lua answers -5 and -6 for the refusals)."""

    MAY = 0
    AT_CAP = 1  # it holds max_slots already
    RESERVED = 2  # the free slots left are kept for other tenants' reservations


@dataclass(frozen=True)
class Load:
    """What the tenants hold now: slots, by tenant, and the turn of each one's last slot taken (a number that
    grows with every take; absent: never)."""

    held: Mapping[str, int] = field(default_factory=dict)
    turns: Mapping[str, int] = field(default_factory=dict)


def rank(share: Share, load: Load) -> tuple[int, float, int]:
    """Smaller goes first: higher priority, then fewer slots held per unit of weight, then the tenant served
    least recently (its own requests then go first come, first served)."""
    return (-share.priority, load.held.get(share.name, 0) / share.weight, load.turns.get(share.name, 0))


def admits(share: Share, held: Mapping[str, int], free: int, rivals: Iterable[Share]) -> Verdict:
    """May ``share`` take one of the ``free`` slots of the servers its request may use? ``held``: slots held now,
    by tenant; ``rivals``: the tenants that may use those servers (``share`` among them or not)."""
    if share.max_slots and held.get(share.name, 0) >= share.max_slots:
        return Verdict.AT_CAP
    kept = sum(max(0, r.reserved_slots - held.get(r.name, 0)) for r in rivals if r.name != share.name)
    return Verdict.RESERVED if kept and free - 1 < kept else Verdict.MAY


def unreserved(rivals: Iterable[Share]) -> bool:
    """No rival keeps slots: the take needs no fleet-wide count of free slots."""
    return all(r.reserved_slots == 0 for r in rivals)
