"""Open N connections that each send one request and wait; report how they were answered, and in what order.

Requests go out one after another from one greenlet (so their arrival order is known), and one
greenlet per connection waits for its answer. Prints "sent" once every request is out (so the
caller can measure the balancer while they all wait), then one JSON object when every answer is in.

usage: python bench/buffer_client.py HOST:PORT N
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

finished: list[int] = []


def send(host: str, port: int, seq: int) -> socket.socket:
    body = json.dumps({"prompt": f"seq {seq}", "n_predict": 1}).encode()
    sock = socket.create_connection((host, port), timeout=900)
    sock.sendall((f"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
    return sock


def answer(sock: socket.socket, seq: int) -> int:
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        return 0
    finally:
        sock.close()
    finished.append(seq)
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1") else 0


def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")
    n = int(sys.argv[2])
    jobs = []
    for seq in range(n):
        try:
            sock = send(host, int(port), seq)
        except OSError as exc:
            print(f"request {seq} could not be sent: {exc!r}", file=sys.stderr, flush=True)
            break
        jobs.append(gevent.spawn(answer, sock, seq))
    print("sent", flush=True)
    started = time.monotonic()
    gevent.joinall(jobs)
    statuses = [j.value if j.successful() else 0 for j in jobs] + [0] * (n - len(jobs))
    displacement = max((abs(rank - seq) for rank, seq in enumerate(finished)), default=0)
    print(json.dumps({"n": n, "ok": statuses.count(200), "other": n - statuses.count(200),
                      "after_sent_s": time.monotonic() - started, "max_displacement": displacement}), flush=True)


if __name__ == "__main__":
    main()
