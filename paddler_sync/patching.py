"""The one place that monkey-patches the standard library for gevent.

Under ``gunicorn -k gevent`` the worker patches before it imports the application, so only the
urllib3 fix below is needed; the command line calls :func:`patch` before importing anything that
touches sockets, ssl or threads. Patching late (after ssl or a lock was imported) leaves unpatched
objects behind, hence the import-order test in tests/live/test_patching.py.
"""

from __future__ import annotations


def patch() -> None:
    """Patch everything (idempotent), then make urllib3's pools gevent-friendly."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        monkey.patch_all()
    fix_urllib3_pool_queue()


def fix_urllib3_pool_queue() -> None:
    """urllib3 binds ``queue.LifoQueue`` at import; a gevent queue avoids pool deadlocks (gevent#1957)."""
    import gevent.queue
    import urllib3.connectionpool

    urllib3.connectionpool.ConnectionPool.QueueCls = gevent.queue.LifoQueue
