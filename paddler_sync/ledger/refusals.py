"""Why a request gets no slot: each refusal carries the status the client gets and the ending the access log and
metrics name. The buffer raises them; the stores raise StateUnavailable when the shared ledger cannot be reached;
the proxy answers each with its status and a message that says what to do."""

from __future__ import annotations

from paddler_sync.endings import Ending


class BufferRefusal(Exception):
    """The request gets no slot; ``status`` and the message say what to answer, ``ending`` names it in the
    access log and metrics, and ``waited`` is how long it waited first (a timeout waited longest of all)."""

    status = 503
    ending = Ending.REFUSED
    waited = 0.0


class BufferFull(BufferRefusal):
    status = 429
    ending = Ending.QUEUE_FULL


class BufferTimeout(BufferRefusal):
    status = 504
    ending = Ending.TIMED_OUT


class BufferClosed(BufferRefusal):
    status = 503
    ending = Ending.SHUTTING_DOWN


class HandedOver(BufferClosed):
    """This worker is being replaced (a reload): the request goes to the new workers instead of waiting here."""


class StateUnavailable(BufferRefusal):
    """The shared slot ledger (Redis) cannot be reached: fail closed, the client may retry."""

    status = 503
    ending = Ending.STATE_UNAVAILABLE


class ClientGone(BufferRefusal):
    status = 499
    ending = Ending.CLIENT_GONE
