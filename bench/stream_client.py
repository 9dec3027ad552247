"""Open N concurrent SSE streams and measure each event's relay delay.

The simulator stamps every event with ``time.monotonic_ns()`` (``--stamp-events``), a clock all
processes on Linux share, so ``delay = receipt - stamp`` is the time an event spent between the
simulator's write and this client's read: the relay cost of whatever sits in between. Raw sockets
and a gevent hub keep the client's own overhead small. Prints one JSON object.

usage: python bench/stream_client.py HOST:PORT STREAMS EVENTS [PATH]
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from gevent.pool import Pool  # noqa: E402

STAMP = re.compile(rb'"stamp_ns":(\d+)')


def one_stream(host: str, port: int, path: str, events: int, index: int) -> dict:
    body = json.dumps({"prompt": f"stream {index}", "n_predict": events, "stream": True}).encode()
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
    started = time.monotonic_ns()
    delays: list[int] = []
    first = None
    recvs = 0
    pending = b""
    try:
        sock = socket.create_connection((host, port), timeout=60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        while True:
            data = sock.recv(65536)
            now = time.monotonic_ns()
            if not data:
                break
            recvs += 1
            pending += data
            *complete, pending = pending.split(b"\n\n")
            for event in complete:
                match = STAMP.search(event)
                if match:
                    delays.append(now - int(match.group(1)))
                    if first is None:
                        first = now
            if b'"stop":true' in data:
                break
        sock.close()
    except OSError as exc:
        return {"ok": False, "error": type(exc).__name__, "delays": delays, "recvs": recvs}
    return {"ok": len(delays) >= events, "delays": delays, "recvs": recvs,
            "ttfb_ns": (first - started) if first else None}


def main() -> None:
    target, streams, events = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    path = sys.argv[4] if len(sys.argv) > 4 else "/completion"
    host, _, port = target.rpartition(":")
    pool = Pool(streams)
    started = time.monotonic()
    jobs = [pool.spawn(one_stream, host, int(port), path, events, i) for i in range(streams)]
    gevent.joinall(jobs)
    wall = time.monotonic() - started
    results = [j.value for j in jobs]
    delays = sorted(d for r in results for d in r["delays"])
    ttfbs = sorted(r["ttfb_ns"] for r in results if r.get("ttfb_ns"))

    def pct(values: list[int], q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] / 1e6 if values else float("nan")

    print(json.dumps({
        "streams": streams, "events_per_stream": events, "wall_s": wall,
        "complete": sum(1 for r in results if r["ok"]), "events": len(delays),
        "events_per_s": len(delays) / wall if wall else 0,
        "delay_p50_ms": pct(delays, 0.5), "delay_p99_ms": pct(delays, 0.99), "delay_max_ms": pct(delays, 1.0),
        "events_per_recv": len(delays) / max(1, sum(r["recvs"] for r in results)),
        "ttfb_p50_ms": pct(ttfbs, 0.5),
    }))


if __name__ == "__main__":
    main()
