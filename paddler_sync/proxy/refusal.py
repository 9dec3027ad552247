"""An answer the balancer gives itself instead of llama.cpp's: status, JSON error, and what the access log says."""

from __future__ import annotations

from typing import Any

from paddler_sync.endings import Ending
from paddler_sync.errors import error_bytes
from paddler_sync.ledger.slots import Reservation


class ProxyError(Exception):
    """An answer the balancer gives itself; ``ending``, ``reservation`` and ``waited`` go to the access log."""

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None,
                 ending: Ending = Ending.REFUSED, reservation: Reservation | None = None, waited: float = 0.0,
                 code: str | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or []
        self.ending = ending
        self.reservation = reservation
        self.waited = waited
        self.code = code  # the error body's code (a word), when not the status's reason
        self.extra = extra  # fields beside the message

    def body(self) -> bytes:
        return error_bytes(self.status, str(self), self.code, self.extra)
