"""Serve the simulator on gevent's WSGI server (``paddler-sync simulate``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
from typing import Any

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer

from paddler_sync.simulator.app import SimulatorApp, SimulatorConfig
from paddler_sync.simulator.engine import Engine, Timing

logger = logging.getLogger("paddler_sync.simulator")


class SocketAwareHandler(WSGIHandler):
    """Expose the client socket, so a non-streaming task can notice a client that left (as llama.cpp does)."""

    def handle(self) -> None:
        # gevent writes headers and body in two sends: without TCP_NODELAY, Nagle and the client's delayed
        # ACK would add ~40 ms to every small answer, which llama.cpp does not
        with contextlib.suppress(OSError):
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle()

    def get_environ(self) -> dict[str, Any]:
        environ = super().get_environ()
        environ["simulator.socket"] = self.socket
        return environ

    def log_request(self) -> None:  # one access line per request is noise at simulator rates
        pass


def build_simulator(options: argparse.Namespace) -> SimulatorApp:
    timing = Timing(prefill_ms_per_token=options.prefill_ms_per_token,
                    decode_tokens_per_second=options.decode_tokens_per_second,
                    decode_jitter=options.decode_jitter)
    engine = Engine(options.parallel, options.ctx_size, timing, prompt_cache=options.prompt_cache,
                    seed=options.seed)
    config = SimulatorConfig(
        model=options.alias, n_ctx=options.ctx_size, slots_endpoint=options.slots,
        metrics_endpoint=options.metrics, embeddings=options.embeddings, api_key=options.api_key,
        dialect=options.dialect, startup_time=options.startup_time,
        default_n_predict=options.default_n_predict, build_info=options.build_info, seed=options.seed,
        stamp_events=options.stamp_events,
    )
    return SimulatorApp(engine, config)


def run_simulator(options: argparse.Namespace) -> int:
    app = build_simulator(options)
    addr = options.addr
    server = WSGIServer((addr.host, addr.port), app, handler_class=SocketAwareHandler, log=None,
                        error_log=logger)
    try:
        server.init_socket()
    except OSError as exc:
        logger.error("cannot listen on %s: %s (is another server using that port?)", addr, exc.strerror)
        return 2
    logger.info("simulated llama.cpp (%s dialect) with %d slots listening on %s", options.dialect,
                options.parallel, addr)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    gevent.signal_handler(signal.SIGINT, server.stop)
    server.serve_forever()
    logger.info("simulator stopped")
    return 0
