"""Logging to stdout, one line per event, the same format in every command."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("urllib3", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def log_greenlet_exception(logger: logging.Logger):
    """A ``link_exception`` callback: a greenlet that dies must never die silently."""

    def report(greenlet) -> None:
        logger.error("greenlet %s died: %r", getattr(greenlet, "name", greenlet), greenlet.exception,
                     exc_info=(type(greenlet.exception), greenlet.exception, greenlet.exception.__traceback__))

    return report
