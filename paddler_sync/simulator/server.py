"""Serve the simulator on gevent's WSGI server (``paddler-sync simulate``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import gevent
from gevent.pywsgi import WSGIHandler, WSGIServer

from paddler_sync.addresses import Address
from paddler_sync.simulator.app import SimulatorApp, SimulatorConfig
from paddler_sync.simulator.engine import Engine, Timing
from paddler_sync.simulator.router import RoutedModel, RouterApp
from paddler_sync.words import counted

logger = logging.getLogger("paddler_sync.simulator")
DEFAULT_MODEL = "models/simulated.gguf"


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


def build_simulator(options: argparse.Namespace) -> SimulatorApp | RouterApp:
    if options.router_models:
        return build_router(options)
    alias = options.alias or options.model or DEFAULT_MODEL
    names: tuple[str, ...] = (alias,)
    if options.dialect == "modern":  # the 2026 build's --alias takes a list; its id is the first in order
        names = tuple(sorted(a for a in alias.split(",") if a)) or (alias,)
    return single_model(options, names[0], names if options.dialect == "modern" else (), options.dialect)


def single_model(options: argparse.Namespace, model: str, aliases: tuple[str, ...], dialect: str,
                 startup_time: float | None = None) -> SimulatorApp:
    timing = Timing(prefill_ms_per_token=options.prefill_ms_per_token,
                    decode_tokens_per_second=options.decode_tokens_per_second,
                    decode_jitter=options.decode_jitter)
    engine = Engine(options.parallel, options.ctx_size, timing, prompt_cache=options.prompt_cache,
                    seed=options.seed)
    config = SimulatorConfig(
        model=model, aliases=aliases, tags=tuple(t for t in (options.tags or "").split(",") if t),
        n_ctx=options.ctx_size, slots_endpoint=options.slots,
        metrics_endpoint=options.metrics, embeddings=options.embeddings, api_key=options.api_key,
        dialect=dialect, startup_time=options.startup_time if startup_time is None else startup_time,
        default_n_predict=options.default_n_predict, build_info=options.build_info, seed=options.seed,
        stamp_events=options.stamp_events,
    )
    return SimulatorApp(engine, config)


def build_router(options: argparse.Namespace) -> RouterApp:
    """Each model a fresh modern single-model server when it loads (its aliases as the router lists them)."""
    def server_of(aliases: tuple[str, ...]) -> Callable[[str], SimulatorApp]:
        return lambda name: single_model(options, name, (name, *aliases), "modern", startup_time=0.0)

    models = [RoutedModel(model_id, aliases, server_of(aliases)) for model_id, aliases in options.router_models]
    return RouterApp(models, options.load_time, options.models_max, options.router_autoload)


def listen_address(options: argparse.Namespace) -> Address:
    """--addr, with llama-server's --host and --port over it (the shape a supervising agent runs)."""
    addr: Address = options.addr
    return Address(options.host or addr.host, options.port or addr.port)


def run_simulator(options: argparse.Namespace) -> int:
    if options.model is not None and not os.path.isfile(options.model):
        logger.error("failed to load model '%s': no such file (llama-server exits the same way)", options.model)
        return 1
    app = build_simulator(options)
    addr = listen_address(options)
    server = WSGIServer((addr.host, addr.port), app, handler_class=SocketAwareHandler, log=None,
                        error_log=logger)
    try:
        server.init_socket()
    except OSError as exc:
        logger.error("cannot listen on %s: %s (is another server using that port?)", addr, exc.strerror)
        return 2
    if options.router_models:
        logger.info("simulated llama.cpp router with models %s (%s each once loaded) listening on %s",
                    ", ".join(m for m, _ in options.router_models), counted(options.parallel, "slot"), addr)
    else:
        logger.info("simulated llama.cpp (%s dialect) with %s listening on %s", options.dialect,
                    counted(options.parallel, "slot"), addr)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    gevent.signal_handler(signal.SIGINT, server.stop)
    server.serve_forever()
    logger.info("simulator stopped")
    return 0
