"""gevent discipline: the entry points import nothing that patching must come before, and patching works.

Patching after ssl, requests or a lock was created leaves unpatched objects behind (gevent warns,
and urllib3 pools can deadlock), so the command line must reach ``patch()`` with none of them loaded.
"""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT

NOT_BEFORE_PATCH = ("ssl", "requests", "urllib3", "logging", "concurrent.futures", "gevent", "flask")


def run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_the_command_line_imports_nothing_risky_before_it_patches() -> None:
    loaded = run(f"import sys; import paddler_sync.cli; print(sorted(m for m in {NOT_BEFORE_PATCH!r} "
                 f"if m in sys.modules))")
    assert loaded == "[]"


def test_settings_parsing_in_gunicorns_master_imports_no_network_stack() -> None:
    """conf/gunicorn.conf.py parses settings in the master, which must stay unpatched and light."""
    loaded = run("import sys; import paddler_sync.settings; print(sorted(m for m in ('requests', 'urllib3', "
                 "'gevent', 'flask') if m in sys.modules))")
    assert loaded == "[]"


def test_patch_makes_sockets_locks_and_urllib3_pools_cooperative() -> None:
    out = run(
        "from paddler_sync.patching import patch; patch()\n"
        "import socket, threading, gevent.socket, gevent.queue, urllib3.connectionpool\n"
        "from gevent import monkey\n"
        "print(socket.socket is gevent.socket.socket, monkey.is_module_patched('threading'),\n"
        "      urllib3.connectionpool.ConnectionPool.QueueCls is gevent.queue.LifoQueue)\n"
    )
    assert out == "True True True"


def test_patch_twice_is_harmless() -> None:
    assert run("from paddler_sync.patching import patch; patch(); patch(); print('ok')") == "ok"
