"""Who sends a request, with ``--tenants``: the key identifies the tenant, and the tenants file's limits apply.

    identify   the key from ``Authorization: Bearer KEY`` or ``x-api-key: KEY`` (Anthropic's clients); no key is
               the anonymous tenant's, if the file has one. Else 401 ``invalid_api_key``, the same answer for a
               missing and an unknown key. The client's key headers go no further: llama.cpp gets
               ``--upstream-api-key`` (or no key).
    allow      403 ``model_not_allowed`` for a model outside the tenant's globs; 429 ``rate_limit_exceeded``
               with ``Retry-After`` and OpenAI's ``x-ratelimit-*`` headers past its requests or tokens per minute
    claim      what the ledger weighs for the tenant's slot (paddler_sync/tenants/rule.py)

The book is paddler_sync/tenants/current.py's, replaced whole on a reload: a request that was identified keeps the
tenant it was identified as until it ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from paddler_sync.endings import Ending
from paddler_sync.ledger.slots import Claim
from paddler_sync.proxy.refusal import ProxyError
from paddler_sync.tenants.book import Tenant
from paddler_sync.tenants.current import CurrentTenants
from paddler_sync.tenants.rates import REQUESTS, Rates, Window

TENANT = "paddler_sync.tenant"  # the environ key of the request's Tenant, for the access log and usage
CLIENT_KEY = "paddler_sync.client_key"  # the client's own key headers, kept for a hand-over to the next workers
KEY_HEADERS = ("HTTP_AUTHORIZATION", "HTTP_X_API_KEY")
PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/models", "/v1/models"})  # llama.cpp's --api-key leaves these open


class Tenancy:
    def __init__(self, current: CurrentTenants, rates: Rates, upstream_key: str | None = None) -> None:
        self.current = current
        self.rates = rates
        self.upstream_auth = f"Bearer {upstream_key}" if upstream_key else None

    def identify(self, environ: dict[str, Any], method: str, path: str) -> Tenant | None:
        """The request's tenant (None without --tenants, and for llama.cpp's open paths without a key)."""
        book = self.current.book
        if book is None:
            return None
        key = presented_key(environ)
        environ[CLIENT_KEY] = {header: environ.pop(header) for header in KEY_HEADERS if header in environ}
        if self.upstream_auth:
            environ["HTTP_AUTHORIZATION"] = self.upstream_auth
        tenant = book.identify(key)
        if tenant is None:
            if path in PUBLIC_PATHS and method in ("GET", "HEAD"):
                return None
            raise ProxyError(401, "no valid API key: send 'Authorization: Bearer KEY' (or 'x-api-key: KEY') with a "
                                  "key of one of the balancer's tenants (--tenants)", [("WWW-Authenticate", "Bearer")],
                             ending=Ending.UNAUTHORIZED, code="invalid_api_key")
        environ[TENANT] = tenant
        return tenant

    def allow(self, tenant: Tenant, model: str | None, named: str | None, takes_slot: bool,
              served: Callable[[], list[str]] = list) -> None:
        """403 for a model the tenant may not use (a request naming none: when a model ``served()`` by the servers
        that could take it is outside the tenant's, asked only then); 429 past its limits (for requests that take a
        slot)."""
        if not tenant.may_use(model) and not (model is None and _all_allowed(tenant, served())):
            what = f"model {named or model!r}" if model is not None else "a request that names no model"
            raise ProxyError(403, f"tenant {tenant.name!r} may not use {what}; its models are "
                                  f"{', '.join(tenant.models)} (the tenants file's 'models')",
                             ending=Ending.MODEL_NOT_ALLOWED, code="model_not_allowed")
        if takes_slot and (tenant.requests_per_minute or tenant.tokens_per_minute):
            windows = self.rates.admit(tenant.name, tenant.requests_per_minute, tenant.tokens_per_minute)
            over = [w for w in windows if w.retry_after > 0]
            if over:
                raise _rate_limited(tenant, over[0], windows)

    def claim(self, tenant: Tenant | None, model: str | None) -> Claim | None:
        book = self.current.book
        if tenant is None or book is None:
            return None
        return Claim(tenant.share, book.shares_for(model))


def _all_allowed(tenant: Tenant, models: list[str]) -> bool:
    return bool(models) and all(tenant.may_use(m) for m in models)


def presented_key(environ: dict[str, Any]) -> str | None:
    authorization = environ.get("HTTP_AUTHORIZATION", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return environ.get("HTTP_X_API_KEY", "").strip() or (authorization or None)


def reset_text(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* form: 1s, 6m0s."""
    whole = max(1, math.ceil(seconds))
    return f"{whole // 60}m{whole % 60}s" if whole >= 60 else f"{whole}s"


def _rate_limited(tenant: Tenant, over: Window, windows: list[Window]) -> ProxyError:
    what = "requests" if over.kind == REQUESTS else "tokens"
    headers = [("Retry-After", str(max(1, math.ceil(over.retry_after))))]
    for w in windows:
        headers += [(f"x-ratelimit-limit-{w.kind}", str(w.limit)),
                    (f"x-ratelimit-remaining-{w.kind}", str(w.remaining)),
                    (f"x-ratelimit-reset-{w.kind}", reset_text(w.reset_seconds))]
    return ProxyError(429, f"tenant {tenant.name!r} is over its {what} per minute ({over.limit}, the tenants file's "
                           f"{what}_per_minute); retry in {reset_text(over.retry_after)}", headers,
                      ending=Ending.RATE_LIMITED, code="rate_limit_exceeded")



def restore_client_key(environ: dict[str, Any]) -> None:
    """The client's own key headers back, in place of llama.cpp's (a request handed over to the next workers)."""
    kept = environ.pop(CLIENT_KEY, None)
    if kept is not None:
        for header in KEY_HEADERS:
            environ.pop(header, None)
        environ.update(kept)
    environ.pop(TENANT, None)  # the next workers count its usage
