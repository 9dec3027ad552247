"""Serving the balancer with gunicorn: the app factory, and ``paddler-sync balancer``'s embedded gunicorn.

The factory runs inside the gunicorn worker, after gevent patched it (never with --preload: the
app would then be imported unpatched in the master). gunicorn hands the app nothing, so our settings
(``gunicorn_settings``: embedded, ``-c python:paddler_sync.gunicorn_conf``, conf/gunicorn.conf.py, or the
project's gunicorn.conf.py that gunicorn reads by itself) add hooks: ``on_starting`` names a taken
address, ``post_fork`` checks the worker before the app loads and hands it over. One worker owns the
in-process ledger, so a second worker would split it: the hook refuses to start in that case, and says
what to do, unless the ledger is shared in Redis (--state-backend), where any number of workers may run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from gunicorn import glogging
from gunicorn.app.base import BaseApplication

from paddler_sync.handover import RELOAD_MARK
from paddler_sync.logs import DATE_FORMAT, GUNICORN_FORMAT
from paddler_sync.settings import parse_settings

if TYPE_CHECKING:
    from paddler_sync.balancer import Balancer

logger = logging.getLogger("paddler_sync.server")
APP_LOAD_ERROR = 4  # gunicorn halts when a worker exits with this: a bad setting must not respawn forever
WORKER_BOOT_ERROR = 3
WITHOUT_OUR_SETTINGS = (
    "gunicorn runs without paddler_sync's gunicorn settings, so its worker count and class go unchecked, its "
    "control socket stays open, requests it cannot parse get HTML errors and SIGTERM does not answer waiting "
    "requests first: start it with -c python:paddler_sync.gunicorn_conf (or from the project's folder, whose "
    "gunicorn.conf.py gunicorn reads by itself)")
MANY_WORKERS_NEED_REDIS = (
    "refusing to start: gunicorn runs %d workers, and with --state-backend local each would keep its own slot "
    "ledger, so two workers could both send a request to the last free slot. Run one worker (-w 1, and check "
    "WEB_CONCURRENCY; one gevent worker serves thousands of streams), or share the ledger in Redis: "
    "--state-backend redis://HOST:6379/0.")


class ThisWorker:
    """The gunicorn worker this process is, as gunicorn's ``post_fork`` hook hands it over (None: no hooks ran,
    gunicorn was started without paddler_sync's settings, or this is no gunicorn worker)."""

    worker: Any = None


def create_balancer(options: argparse.Namespace | None = None) -> Balancer:
    """Build and start the balancer in this gunicorn worker; ``wsgi.py`` calls it with no options."""
    from paddler_sync.patching import patch

    patch()
    if options is None:
        options = settings_from_environment()
    from paddler_sync.balancer import Balancer
    from paddler_sync.logs import setup_logging

    setup_logging(options.log_level)
    if not libraries_fit():
        sys.exit(APP_LOAD_ERROR)  # gunicorn's master stops instead of respawning a worker that cannot work
    worker = ThisWorker.worker
    unchecked = worker is None and "gunicorn.workers.base" in sys.modules  # a gunicorn worker, without our hooks
    if worker is not None:
        answer_parse_errors_in_json(worker)
    elif unchecked:
        logger.warning(WITHOUT_OUR_SETTINGS)
    balancer = Balancer(options)
    balancer.start(workers_unchecked=unchecked)
    if worker is not None:
        balancer.watch_worker(worker)
    return balancer


def libraries_fit() -> bool:
    """The private parts of libraries the proxy leans on are there (paddler_sync/library_checks.py); each missing
    one is logged with the release to install, each unverified release warned about."""
    from paddler_sync.library_checks import problems

    errors, warnings = problems()
    for warning in warnings:
        logger.warning(warning)
    for error in errors:
        logger.error(error)
    return not errors


def settings_from_environment() -> argparse.Namespace:
    """Under gunicorn, argv is gunicorn's: settings come from conf/balancer.conf and PADDLER_* only."""
    try:
        return parse_settings("balancer", args=[])
    except SystemExit:
        sys.exit(APP_LOAD_ERROR)


def post_fork(worker: Any, options: argparse.Namespace) -> None:
    """gunicorn's ``post_fork`` hook, in the new worker before the app loads: refuse a setup that would split the
    ledger, or hold a whole worker per stream; remember the worker for the app."""
    check_gunicorn_worker(worker, options)
    ThisWorker.worker = worker


def check_gunicorn_worker(worker: Any, options: argparse.Namespace) -> None:
    cfg = worker.cfg
    if cfg.workers != 1 and options.state_backend == "local":
        logger.error(MANY_WORKERS_NEED_REDIS, cfg.workers)
        sys.exit(WORKER_BOOT_ERROR)
    if "gevent" not in str(cfg.worker_class_str).lower():
        logger.error("refusing to start: gunicorn's worker class is %s; run it with -k gevent, or every "
                     "stream would hold a whole worker", cfg.worker_class_str)
        sys.exit(WORKER_BOOT_ERROR)
    binds = [str(b) for b in cfg.bind]
    if str(options.reverseproxy_addr) not in binds and not is_default(options, "reverseproxy-addr"):
        logger.warning("gunicorn binds %s but --reverseproxy-addr is %s: the proxy serves on gunicorn's bind",
                       ", ".join(binds), options.reverseproxy_addr)


def is_default(options: argparse.Namespace, name: str) -> bool:
    """Left as shipped: then gunicorn's own -b (a platform's $PORT) is no contradiction worth a warning."""
    from paddler_sync.settings import SETTINGS

    setting = next(s for s in SETTINGS if s.name == name)
    return getattr(options, setting.dest) == setting.default


def on_starting(arbiter: Any, options: argparse.Namespace) -> None:
    refuse_taken_addresses(arbiter, options)
    reload_safely_on_hup(arbiter, options)


def reload_safely_on_hup(arbiter: Any, options: argparse.Namespace) -> None:
    """SIGHUP to gunicorn's master: the settings (config files, the tenants file) are read again first, and a
    mistake keeps the running workers as they are (gunicorn would start new workers that cannot boot, and halt).
    Then gunicorn's reload: new workers with the new settings; the old ones, told first that they are being
    replaced (SIGUSR2), hand their waiting requests to the new ones and finish their running answers."""
    reload = arbiter.handle_hup

    def handle_hup() -> None:
        try:
            fresh = parse_settings("balancer", args=options.argv)
        except SystemExit:
            arbiter.log.error("SIGHUP: not reloaded, the settings have a mistake (said above); the workers keep "
                              "running as they are")
            return
        if isinstance(arbiter.app, BalancerApplication):
            arbiter.app.options = fresh
        for pid in list(arbiter.WORKERS):
            arbiter.kill_worker(pid, signal.SIGUSR2)
        os.environ[RELOAD_MARK] = "1"  # the new workers wait for the old ones' management port
        try:
            reload()
        finally:
            os.environ.pop(RELOAD_MARK, None)

    arbiter.handle_hup = handle_hup


def refuse_taken_addresses(arbiter: Any, options: argparse.Namespace) -> None:
    """gunicorn's ``on_starting`` hook: an address held by another program fails at once, naming the setting.

    Left alone, gunicorn retries a taken address for five seconds, then exits saying only
    ``connection to ('127.0.0.1', 8080) failed``. Sockets handed over (re-exec, systemd) are not checked.
    """
    if arbiter.LISTENERS or "GUNICORN_FD" in os.environ or "LISTEN_FDS" in os.environ:
        return
    proxy_addr = str(options.reverseproxy_addr)
    for bind in arbiter.cfg.bind:
        problem = address_problem(str(bind))
        if problem is None:
            continue
        setting = ("--reverseproxy-addr (PADDLER_REVERSEPROXY_ADDR)" if str(bind) == proxy_addr
                   else "gunicorn's -b / --bind (on a platform, its $PORT)")
        arbiter.log.error("cannot listen on %s for the reverse proxy: %s. Another program holds it (`ss -ltnp` "
                          "shows which): stop it, or choose another address with %s", bind, problem, setting)
        sys.exit(1)


def address_problem(bind: str) -> str | None:
    """Why nothing could listen on ``host:port`` now (None when it could); unix sockets are not checked."""
    if bind.startswith(("unix:", "fd://")) or ":" not in bind:
        return None
    host, _, port = bind.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except (OSError, ValueError):
        return None  # gunicorn says what is wrong with it
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def answer_parse_errors_in_json(worker: Any) -> None:
    """Requests gunicorn cannot parse (too long, too many headers, bad framing) get our JSON errors.

    gunicorn answers them itself, before the app sees anything, with an HTML body; clients of an
    OpenAI-style API parse ``{"error": ...}``. Its status choice (400/414/431/501) is kept.
    """
    from paddler_sync.proxy.parse_errors import json_error_handler

    worker.handle_error = json_error_handler(worker.handle_error, worker.log)


def gunicorn_settings(options: argparse.Namespace) -> dict[str, Any]:
    """What the embedded gunicorn runs with; conf/gunicorn.conf.py sets the same for the bare command."""
    return {
        "bind": [str(options.reverseproxy_addr)],
        "worker_class": "gevent",
        "workers": options.workers,
        "worker_connections": options.max_client_connections,
        "graceful_timeout": math.ceil(options.graceful_timeout),  # gunicorn takes whole seconds
        "timeout": 30,
        "keepalive": 5,
        "limit_request_line": options.max_request_line,
        "limit_request_field_size": options.max_header_size,
        "limit_request_fields": options.max_headers,
        "accesslog": None,
        "errorlog": "-",
        "logger_class": "paddler_sync.server.GunicornLogger",
        "loglevel": options.log_level,
        "proc_name": "paddler-sync-balancer",
        # gunicornc could add workers at run time, splitting the ledger; several balancers would also
        # fight over one default socket path.
        "control_socket_disable": True,
        # gunicorn trusts SCRIPT_NAME / PATH_INFO headers from loopback clients by default: a client's
        # "SCRIPT_NAME: x" header then made it answer 500 with an HTML page. Nothing here mounts the app
        # under a path a proxy in front must announce, so no header may move it.
        "forwarder_headers": "",
        "on_starting": lambda arbiter: on_starting(arbiter, options),
        "post_fork": lambda _arbiter, worker: post_fork(worker, options),
    }


class GunicornLogger(glogging.Logger):
    """gunicorn's own lines (start-up, workers) in our shape: UTC, with the zone said. Not through gunicorn's
    logconfig_dict, which would also switch its access log on: one more line, and its cost, per request."""

    error_fmt = GUNICORN_FORMAT
    datefmt = DATE_FORMAT

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for handler in self.error_log.handlers:
            if handler.formatter is not None:
                handler.formatter.converter = time.gmtime


class BalancerApplication(BaseApplication):
    """gunicorn, embedded: ``paddler-sync balancer`` needs no gunicorn command line."""

    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in gunicorn_settings(self.options).items():
            self.cfg.set(key, value)

    def load(self) -> Balancer:
        return create_balancer(self.options)


def run_balancer(options: argparse.Namespace) -> int:
    from paddler_sync.library_checks import problems

    errors, _ = problems()  # (warnings: each worker logs them)
    if errors:
        print("\n".join(f"paddler-sync balancer: error: {e}" for e in errors), file=sys.stderr)
        return 2
    if options.workers > 1 and options.state_backend == "local":
        print(f"paddler-sync balancer: --workers {options.workers} needs a shared ledger: add --state-backend "
              f"redis://HOST:6379/0, or run --workers 1", file=sys.stderr)
        return 2
    BalancerApplication(options).run()
    return 0
