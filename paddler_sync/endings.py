"""How a request ended: one name per fate, shared by the access log, the metrics and the dashboards.

A ``StrEnum``, so an ending prints and serializes as its name (``end=timed_out``) and the documentation's
table, the log and the JSON all say the same word.
"""

from __future__ import annotations

from enum import StrEnum


class Ending(StrEnum):
    DONE = "done"  # the answer was relayed whole
    CLIENT_GONE = "client_gone"  # the client left: while waiting, while llama.cpp ran, or mid-stream
    TIMED_OUT = "timed_out"  # no slot came free within --buffered-request-timeout
    QUEUE_FULL = "queue_full"  # --max-buffered-requests already waited
    NO_SERVER = "no_server"  # a slot-free request found no ready server
    SHUTTING_DOWN = "shutting_down"
    STATE_UNAVAILABLE = "state_unavailable"  # the shared ledger (Redis) did not answer
    UPSTREAM_TIMEOUT = "upstream_timeout"  # llama.cpp sent no response within --upstream-read-timeout
    UPSTREAM_ERROR = "upstream_error"  # llama.cpp failed before or while answering
    UPSTREAM_REFUSED = "upstream_refused"  # no server accepted a connection
    FORBIDDEN = "forbidden"  # /slots without --slots-endpoint-enable
    BODY_TOO_LARGE = "body_too_large"
    UNKNOWN_MODEL = "unknown_model"  # 404: no server serves the model it names
    BAD_JSON = "bad_json"  # 400: a slot-taking request whose body is not JSON (never sent upstream)
    BAD_MODEL = "bad_model"  # 400: 'model' is not a string, or none named where every server needs one
    CONTEXT_TOO_LONG = "context_too_long"  # 400: prompt and limit fit no slot of its model
    UNAUTHORIZED = "unauthorized"  # 401: no key, or a key of no tenant (--tenants)
    MODEL_NOT_ALLOWED = "model_not_allowed"  # 403: the tenant's models do not include it
    RATE_LIMITED = "rate_limited"  # 429: the tenant's requests or tokens per minute
    REFUSED = "refused"  # any other answer of the balancer's own
