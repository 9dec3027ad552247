"""Replay an open-loop trace (Poisson arrivals) of streaming completions and time each request.

usage: python bench/fleet_client.py HOST:PORT TRACE.json  →  prints one JSON list of per-request results
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

PREDICTED = re.compile(rb'"tokens_predicted":(\d+)')


def one(host: str, port: int, start: float, item: dict) -> dict:
    gevent.sleep(max(0.0, start + item["at"] - time.monotonic()))
    sent = time.monotonic()
    named = {"model": item["model"]} if "model" in item else {}
    body = json.dumps({"prompt": item["prompt"], "n_predict": item["n_predict"], "stream": True, **named}).encode()
    result = {"at": item["at"], "sent": sent - start, "status": 0, "ttft": None, "e2e": None, "tokens": 0}
    try:
        sock = socket.create_connection((host, port), timeout=600)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall((f"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            if result["ttft"] is None and b"data: " in chunk:
                result["ttft"] = time.monotonic() - sent
            data += chunk
            if b'"stop":true' in chunk:
                break
        sock.close()
        result["status"] = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1") else 0
        counts = PREDICTED.findall(data)
        result["tokens"] = int(counts[-1]) if counts and result["status"] == 200 else 0
        result["e2e"] = time.monotonic() - sent
        result["done"] = time.monotonic() - start
    except OSError as exc:
        result["error"] = type(exc).__name__
    return result


def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")
    with open(sys.argv[2]) as file:
        trace = json.load(file)
    start = time.monotonic() + 0.5
    jobs = [gevent.spawn(one, host, int(port), start, item) for item in trace]
    gevent.joinall(jobs)
    print(json.dumps([j.value for j in jobs]))


if __name__ == "__main__":
    main()
