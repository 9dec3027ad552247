"""Multi-turn conversations, as chat UIs send them: every turn re-sends the whole history, llama.cpp's own answers
in it, streamed; conversations run side by side, turns of one conversation one after another, with 0.3 to 2 s
of the user's reading and typing between them (seeded).

usage: python bench/conversation_client.py HOST:PORT CONVERSATIONS TURNS SYSTEM_WORDS MAX_TOKENS SEED
  →  prints one JSON list: per turn, its conversation, turn, TTFT, prompt tokens, prompt tokens computed
     (timings.prompt_n), tokens generated and its whole time
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

THINK_SECONDS = (0.3, 2.0)
WORDS = ["river", "light", "model", "token", "slot", "server", "quick", "brown", "fox", "jumps", "over", "lazy",
         "dog", "cloud", "stone", "paper", "glass", "north", "south", "east", "west", "garden", "window", "market"]


def stream_chat(host: str, port: int, messages: list[dict], max_tokens: int) -> dict:
    body = json.dumps({"messages": messages, "max_tokens": max_tokens, "stream": True}).encode()
    sent = time.monotonic()
    result: dict = {"ttft": None, "status": 0, "content": "", "prompt_tokens": 0, "prompt_n": 0, "tokens": 0}
    sock = socket.create_connection((host, port), timeout=600)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
    data = b""
    while chunk := sock.recv(65536):
        if result["ttft"] is None and b'"content":"' in chunk:
            result["ttft"] = time.monotonic() - sent
        data += chunk
    sock.close()
    result["e2e"] = time.monotonic() - sent
    result["status"] = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1") else 0
    for line in data.split(b"\n"):
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        for choice in event.get("choices") or []:
            result["content"] += (choice.get("delta") or {}).get("content") or ""
        if "timings" in event:
            result["prompt_n"] = event["timings"]["prompt_n"]
            result["prompt_tokens"] = event["usage"]["prompt_tokens"]
            result["tokens"] = event["usage"]["completion_tokens"]
    return result


def conversation(host: str, port: int, number: int, turns: int, system_words: int, max_tokens: int,
                 rng: random.Random, start: float) -> list[dict]:
    gevent.sleep(max(0.0, start + number * 0.2 - time.monotonic()))  # arrivals spread a little
    system = " ".join(rng.choice(WORDS) for _ in range(system_words))
    messages = [{"role": "system", "content": f"Conversation {number}. {system}"}]
    out = []
    for turn in range(turns):
        messages.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(20))})
        answer = stream_chat(host, port, messages, max_tokens)
        messages.append({"role": "assistant", "content": answer.pop("content")})
        out.append({"conversation": number, "turn": turn, **answer})
        gevent.sleep(rng.uniform(*THINK_SECONDS))  # the user reads the answer and types the next question
    return out


def main() -> None:
    host, _, port = sys.argv[1].rpartition(":")
    conversations, turns, system_words, max_tokens, seed = (int(v) for v in sys.argv[2:7])
    start = time.monotonic() + 0.3
    jobs = [gevent.spawn(conversation, host, int(port), n, turns, system_words, max_tokens,
                         random.Random(seed * 1000 + n), start) for n in range(conversations)]
    gevent.joinall(jobs)
    print(json.dumps([turn for job in jobs for turn in job.value]))


if __name__ == "__main__":
    main()
