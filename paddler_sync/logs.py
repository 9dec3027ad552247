"""Logging to stdout, one line per event, the same format in every command; times in UTC (as the dashboards')."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"
GUNICORN_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)-7s gunicorn[%(process)d]: %(message)s"


class UTCFormatter(logging.Formatter):
    converter = staticmethod(time.gmtime)  # gmtime takes the record time, as localtime does


def utc_formatter() -> logging.Formatter:
    return UTCFormatter(FORMAT, DATE_FORMAT)




def setup_logging(level: str = "info") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(utc_formatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_greenlet_exception(logger: logging.Logger) -> Callable[[Any], None]:
    """A ``link_exception`` callback: a greenlet that dies must never die silently."""

    def report(greenlet: Any) -> None:
        logger.error("greenlet %s died: %r", getattr(greenlet, "name", greenlet), greenlet.exception,
                     exc_info=(type(greenlet.exception), greenlet.exception, greenlet.exception.__traceback__))

    return report
