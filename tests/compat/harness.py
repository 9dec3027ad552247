"""A pytest plugin for llama.cpp's suites under the compatibility tier (``-p harness``): after the suite's harness
stops a server, it waits until nothing listens on that server's port any more.

The harness kills the program it started (b4748 with SIGKILL, without waiting) and starts the next test's server
on the same port at once, polling its /health straight away. A process killed on a loaded 2-core machine can take
tens of milliseconds to close its listening socket; a fleet of three processes longer. Meanwhile the dying server
could answer the next test's first requests. Waiting for the port changes nothing a test asserts, and holds for
both runs alike: directly and through the balancer.
"""

from __future__ import annotations

import socket
import sys
import time

import pytest

WAIT_SECONDS = 10.0
_patched = False


def wait_until_closed(host: str, port: int) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex((host, port)) != 0:
                return
        time.sleep(0.01)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """The suite's own ``utils`` module is imported by then (its tests do ``from utils import *``)."""
    global _patched
    utils = sys.modules.get("utils")
    if _patched or utils is None:
        return
    original = utils.ServerProcess.stop

    def stop(self: object) -> None:
        original(self)
        wait_until_closed(str(getattr(self, "server_host", "127.0.0.1")), int(getattr(self, "server_port", 8080)))

    utils.ServerProcess.stop = stop
    _patched = True
