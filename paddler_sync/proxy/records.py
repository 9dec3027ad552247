"""Where a finished request is written down: the metrics, the dashboards' figures, its tenant's usage and rate
window, and one access-log line (``tenant=`` names whose it was, ``-`` without --tenants)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from paddler_sync.endings import Ending
from paddler_sync.ledger.slots import Reservation
from paddler_sync.proxy.retry import RETRIED
from paddler_sync.proxy.tenancy import TENANT
from paddler_sync.tenants.book import Tenant
from paddler_sync.tenants.rates import Rates

if TYPE_CHECKING:
    from paddler_sync.metrics import Metrics

access_log = logging.getLogger("paddler_sync.access")


class Recorder:
    def __init__(self, metrics: Metrics, rates: Rates) -> None:
        self.metrics = metrics
        self.rates = rates

    def record(self, environ: dict[str, Any], status: int, reservation: Reservation | None, waited: float,
               started: float, first_byte: float | None = None, sent: int = 0, ending: Ending = Ending.REFUSED,
               first_token: float | None = None, tokens: int | None = None,
               prompt: tuple[int, int] | None = None) -> None:
        """One finished request: into the metrics and the dashboards' traffic figures, and one access line.
        ``prompt``: its prompt tokens and those llama.cpp's cache held (``cached=HIT/ALL`` in the line)."""
        now = time.monotonic()
        ttfb_seconds = first_byte - started if first_byte else None
        self.metrics.request_done(status, ending, reservation.addr if reservation else None, waited, ttfb_seconds,
                                  now - started, first_token - started if first_token else None, tokens, prompt)
        tenant: Tenant | None = environ.get(TENANT)
        if tenant is not None:
            self._tenant_done(tenant, status, ending, reservation, waited, now - started, tokens, prompt)
        if not access_log.isEnabledFor(logging.INFO):
            return
        ttfb = f"{(first_byte - started) * 1000:.1f}ms" if first_byte else "-"
        access_log.info('%s "%s %s" %d upstream=%s wait=%.1fms ttfb=%s duration=%.1fms bytes=%d end=%s cached=%s '
                        'tenant=%s retried=%d', environ.get("REMOTE_ADDR", "-"), environ["REQUEST_METHOD"],
                        environ.get("PATH_INFO", "/"), status, reservation.addr if reservation else "-",
                        waited * 1000, ttfb, (now - started) * 1000, sent, ending,
                        f"{prompt[1]}/{prompt[0]}" if prompt else "-", tenant.name if tenant else "-",
                        environ.get(RETRIED, 0))

    def _tenant_done(self, tenant: Tenant, status: int, ending: Ending, reservation: Reservation | None,
                     waited: float, duration: float, generated: int | None, prompt: tuple[int, int] | None) -> None:
        """Its usage, and its tokens into its tokens-per-minute window (llama.cpp's own counts) when it has one:
        with Redis that is a round trip per request, owed only by tenants whose tokens are limited."""
        slot_seconds = max(0.0, duration - waited) if reservation is not None and reservation.uses_slot else 0.0
        tokens = {"prompt": prompt[0] if prompt else 0, "cached": prompt[1] if prompt else 0,
                  "generated": generated or 0}
        self.metrics.tenant_done(tenant.name, status, ending, waited, slot_seconds, tokens)
        if tenant.tokens_per_minute:
            self.rates.add_tokens(tenant.name, tokens["prompt"] + tokens["generated"])
