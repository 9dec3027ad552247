"""``paddler-sync agent``: set the agent up from its settings, run it, and leave cleanly.

On SIGTERM or SIGINT the agent first asks the balancer to drain its server and waits (up to
--drain-timeout) for the balancer's requests there to finish, then stops the llama-server it supervises,
then deregisters, so nothing is cut that did not have to be. A second signal skips the wait.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import uuid

import gevent
from gevent.event import Event
from gevent.pool import Group

from paddler_sync.addresses import Address
from paddler_sync.agent.aws import MetadataError, fetch_local_ipv4
from paddler_sync.agent.launch import CommandLine
from paddler_sync.agent.monitor import Agent, BalancerClient
from paddler_sync.agent.supervisor import RestartPolicy, Supervisor
from paddler_sync.llamacpp import LlamaCppClient
from paddler_sync.logs import log_greenlet_exception
from paddler_sync.protocol.states import ServerState
from paddler_sync.protocol.supervision import Control, DrainMark, SupervisionError
from paddler_sync.words import counted

logger = logging.getLogger("paddler_sync.agent")
DRAIN_POLL_SECONDS = 0.1


def resolve_aws_addresses(options: argparse.Namespace) -> None:
    """Replace ``aws:metadata:local-ipv4`` placeholders at start-up, asking the metadata service once."""
    placeholders = ("local_llamacpp_addr", "external_llamacpp_addr", "management_addr")
    if not any(getattr(options, key) is not None and getattr(options, key).is_aws_placeholder
               for key in placeholders):
        return
    ipv4 = fetch_local_ipv4(options.aws_metadata_endpoint)
    for key in placeholders:
        addr = getattr(options, key)
        if addr is not None and addr.is_aws_placeholder:
            setattr(options, key, addr.with_host(ipv4))
            logger.info("--%s resolved from EC2 instance metadata: %s", key.replace("_", "-"), getattr(options, key))


def external_address(options: argparse.Namespace) -> Address:
    external = options.external_llamacpp_addr or options.local_llamacpp_addr
    return external if external.port else Address(external.host, options.local_llamacpp_addr.port)


def make_supervisor(options: argparse.Namespace) -> Supervisor:
    """The llama-server this agent runs: it listens where the agent then watches (--local-llamacpp-addr)."""
    program = options.supervise[0]
    if shutil.which(program) is None:
        raise SupervisionError(2, f"--supervise: cannot run `{program}`: no such program (give its full path, e.g. "
                                  "--supervise -- /opt/llama.cpp/build/bin/llama-server -m model.gguf)")
    command = CommandLine.prepare(options.supervise)
    options.local_llamacpp_addr = command.listen
    policy = RestartPolicy(options.supervise_max_restarts, options.supervise_backoff, options.supervise_backoff_max,
                           options.supervise_start_timeout, options.supervise_unresponsive_timeout,
                           options.supervise_stop_timeout)
    return Supervisor(command, policy, logging.getLevelName(options.supervise_log_level.upper()))


def run_agent(options: argparse.Namespace) -> int:
    if options.local_llamacpp_addr.port == 0:
        sys.stderr.write("paddler-sync agent: error: --local-llamacpp-addr needs a port, "
                         "e.g. aws:metadata:local-ipv4:8080\n")
        return 2
    try:
        resolve_aws_addresses(options)
    except MetadataError as exc:
        sys.stderr.write(f"paddler-sync agent: error: {exc}\n")
        return 2
    try:
        supervisor = make_supervisor(options) if options.supervise else None
    except SupervisionError as exc:
        sys.stderr.write(f"paddler-sync agent: error: {exc}\n")
        return 2
    agent_id = str(uuid.uuid4())
    agent = Agent(
        LlamaCppClient(options.local_llamacpp_addr, options.llamacpp_api_key, options.llamacpp_timeout),
        BalancerClient(options.management_addr, agent_id, options.management_path_prefix, options.management_token),
        external_address(options), options.monitoring_interval, options.name, options.llamacpp_sleep_idle_seconds,
        supervisor, options.label,
    )
    logger.info("agent %s watches llama.cpp at %s and reports it as %s to %s every %gs", agent_id,
                options.local_llamacpp_addr, agent.external_addr, options.management_addr,
                options.monitoring_interval)
    if supervisor is not None:
        supervisor.start()
    stop, hurry = Event(), Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(signum, lambda: (hurry if stop.is_set() else stop).set())
    group = Group()
    group.spawn(agent.run, Event()).link_exception(log_greenlet_exception(logger))
    stop.wait()
    drain_before_leaving(agent, options.drain_timeout, hurry)
    group.kill(block=True, timeout=5)
    if supervisor is not None:
        supervisor.shutdown()
    agent.balancer.deregister()
    return 0


def drain_before_leaving(agent: Agent, timeout: float, hurry: Event) -> None:
    """Drain, and wait while the balancer's requests run on the server (reports go on meanwhile). A supervised
    server is also waited for until its slots are idle, since it is about to be stopped."""
    in_flight = agent.balancer.drain()
    if in_flight is None:
        return
    logger.info("stopping: draining first (%s in flight, up to %gs; a second signal skips the wait)",
                counted(in_flight, "request"), timeout)
    agent.balancer.control = Control(DrainMark(True), in_flight=in_flight)  # the drain's answer is the latest word
    with gevent.Timeout(timeout, False):
        while not hurry.is_set() and not _drained(agent) and agent.balancer.reachable:
            hurry.wait(DRAIN_POLL_SECONDS)
    if not agent.balancer.reachable:
        logger.warning("the balancer stopped answering while the server drained: stopping without waiting")
    elif not _drained(agent):
        logger.warning("stopping with requests still running on the server (drain timeout or second signal)")


def _drained(agent: Agent) -> bool:
    control = agent.balancer.control  # the drain's answer, then each report's
    if control is None or control.in_flight:
        return False
    reading = agent.last_reading
    return agent.supervisor is None or reading is None or reading.state is not ServerState.READY \
        or reading.slots_processing == 0
