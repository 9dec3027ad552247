"""Counted nouns in log lines and messages: "1 request", "3 requests" (an operator reads them, not a parser)."""

from __future__ import annotations


def counted(number: int, noun: str, plural: str | None = None) -> str:
    """``counted(1, "request")`` is "1 request"; ``counted(2, "request")`` is "2 requests"."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"
