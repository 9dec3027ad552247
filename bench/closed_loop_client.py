"""Closed-loop clients: each sends a completion, waits for the whole answer, and sends the next one at once.

usage: python bench/closed_loop_client.py HOST:PORT CLIENTS SECONDS N_PREDICT [stream]
prints one JSON object: requests, tokens, statuses, per-request latencies (seconds), and the run's length.
Each client keeps one kept-alive connection (re-opened when the server closes it), as an SDK would.
"""

from gevent import monkey

monkey.patch_all()

import http.client  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

PREDICTED = re.compile(rb'"tokens_predicted":(\d+)')


def client(host: str, port: int, until: float, n_predict: int, stream: bool, out: dict) -> None:
    body = json.dumps({"prompt": "Once upon a time", "n_predict": n_predict, "ignore_eos": True,
                       "stream": stream}).encode()
    conn: http.client.HTTPConnection | None = None
    while time.monotonic() < until:
        sent = time.monotonic()
        try:
            conn = conn or http.client.HTTPConnection(host, port, timeout=600)
            conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            data = response.read()
            status = response.status
            if response.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as exc:
            out["statuses"][type(exc).__name__] = out["statuses"].get(type(exc).__name__, 0) + 1
            if conn is not None:
                conn.close()
            conn = None
            continue
        done = time.monotonic()
        out["statuses"][str(status)] = out["statuses"].get(str(status), 0) + 1
        if status == 200 and done <= until:
            counts = PREDICTED.findall(data)
            out["tokens"] += int(counts[-1]) if counts else 0
            out["latencies"].append(done - sent)


def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")
    clients, seconds, n_predict = int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    stream = len(sys.argv) > 5 and sys.argv[5] == "stream"
    out: dict = {"tokens": 0, "latencies": [], "statuses": {}}
    started = time.monotonic()
    until = started + seconds
    jobs = [gevent.spawn(client, host, int(port), until, n_predict, stream, out) for _ in range(clients)]
    gevent.joinall(jobs)
    out["seconds"] = seconds
    out["requests"] = len(out["latencies"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
