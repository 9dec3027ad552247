"""Record what a real llama-server answers, in the format of tests/captures/ (curl line, status, headers, body).

usage: python scripts/record_captures.py LLAMA_SERVER MODEL.gguf OUT_DIR
Starts the server as the b4748 captures were (-c 4096 -np 4 --metrics, plus --api-key or --no-slots where a
capture needs it) on port 18080, replays each request, and writes one file per exchange; the model's path
is scrubbed to models/tiny.gguf and the temporary folder's name disappears. Used for tests/captures/2026/.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PORT = 18080
ROUTER = ("ROUTER",)  # not a flag: start in router mode, with a --models-dir holding the model as tiny.gguf
CHAT = {"model": "x", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 16}
# (file, server flags, method, path, headers, body)
EXCHANGES: list[tuple[str, tuple[str, ...], str, str, dict[str, str], object]] = [
    ("01-health-idle.txt", (), "GET", "/health", {}, None),
    ("02-slots-idle.txt", (), "GET", "/slots", {}, None),
    ("03-props.txt", (), "GET", "/props", {}, None),
    ("04-metrics-idle.txt", (), "GET", "/metrics", {}, None),
    ("05-v1-models.txt", (), "GET", "/v1/models", {}, None),
    ("05b-models.txt", (), "GET", "/models", {}, None),
    ("06-completion-nonstream.txt", (), "POST", "/completion", {}, {"prompt": "Hello, my name is", "n_predict": 16}),
    ("07-completion-stream.txt", (), "POST", "/completion", {},
     {"prompt": "Hello, my name is", "n_predict": 16, "stream": True}),
    ("08-chat-nonstream.txt", (), "POST", "/v1/chat/completions", {}, CHAT),
    ("09-chat-stream.txt", (), "POST", "/v1/chat/completions", {}, {**CHAT, "stream": True}),
    ("10-v1-completions.txt", (), "POST", "/v1/completions", {},
     {"model": "x", "prompt": "Once upon a time", "max_tokens": 16}),
    ("10b-v1-completions-stream.txt", (), "POST", "/v1/completions", {},
     {"model": "x", "prompt": "Once upon a time", "max_tokens": 4, "stream": True}),
    ("11-tokenize.txt", (), "POST", "/tokenize", {}, {"content": "Hello world"}),
    ("11c-detokenize.txt", (), "POST", "/detokenize", {}, {"tokens": [15043, 3186]}),
    ("15-slots-fail-on-no-slot-idle.txt", (), "GET", "/slots?fail_on_no_slot=1", {}, None),
    ("16-unknown-path.txt", (), "GET", "/nonexistent", {}, None),
    ("17-completion-bad-json.txt", (), "POST", "/completion", {}, '{"prompt": '),
    ("19-health-v1.txt", (), "GET", "/v1/health", {}, None),
    ("20-props-post-disabled.txt", (), "POST", "/props", {}, {}),
    ("22-responses-nonstream.txt", (), "POST", "/v1/responses", {}, {"model": "x", "input": "Say hi",
                                                                     "max_output_tokens": 16}),
    ("22b-responses-stream.txt", (), "POST", "/v1/responses", {}, {"model": "x", "input": "Say hi",
                                                                   "max_output_tokens": 4, "stream": True}),
    ("23-messages-nonstream.txt", (), "POST", "/v1/messages", {}, CHAT),
    ("23b-messages-stream.txt", (), "POST", "/v1/messages", {}, {**CHAT, "max_tokens": 4, "stream": True}),
    ("24-messages-count-tokens.txt", (), "POST", "/v1/messages/count_tokens", {}, CHAT),
    ("25-chat-input-tokens.txt", (), "POST", "/v1/chat/completions/input_tokens", {}, CHAT),
    ("51-apikey-completion-nokey.txt", ("--api-key", "secret"), "POST", "/completion", {}, {"prompt": "x"}),
    ("52-apikey-slots-nokey.txt", ("--api-key", "secret"), "GET", "/slots", {}, None),
    ("53-apikey-health-nokey.txt", ("--api-key", "secret"), "GET", "/health", {}, None),
    ("56-apikey-goodkey-stream.txt", ("--api-key", "secret"), "POST", "/completion",
     {"Authorization": "Bearer secret"}, {"prompt": "x", "n_predict": 4, "stream": True}),
    ("60-noslots-slots.txt", ("--no-slots",), "GET", "/slots", {}, None),
    # router mode (no -m; --models-dir holding tiny.gguf), in this order: the model loads on the way
    ("90-router-props.txt", ROUTER, "GET", "/props", {}, None),
    ("91-router-models-unloaded.txt", ROUTER, "GET", "/models", {}, None),
    ("92-router-slots-no-model.txt", ROUTER, "GET", "/slots", {}, None),
    ("93-router-completion-no-model.txt", ROUTER, "POST", "/completion", {}, {"prompt": "x", "n_predict": 2}),
    ("94-router-unknown-model.txt", ROUTER, "POST", "/v1/chat/completions", {}, {**CHAT, "model": "nope"}),
    ("95-router-slots-not-loaded.txt", ROUTER, "GET", "/slots?model=tiny&autoload=false", {}, None),
    ("96-router-load.txt", ROUTER, "POST", "/models/load", {}, {"model": "tiny"}),
    ("97-router-models-loaded.txt", ROUTER, "GET", "/models", {}, None),
    ("98-router-slots.txt", ROUTER, "GET", "/slots?model=tiny&autoload=false", {}, None),
    ("99-router-chat.txt", ROUTER, "POST", "/v1/chat/completions", {}, {**CHAT, "model": "tiny"}),
    ("99b-router-props-model.txt", ROUTER, "GET", "/props?model=tiny&autoload=false", {}, None),
    ("99c-router-unload.txt", ROUTER, "POST", "/models/unload", {}, {"model": "tiny"}),
]


def curl_line(method: str, path: str, headers: dict[str, str], body: object) -> str:
    parts = ["curl"]
    if isinstance(body, dict) and body.get("stream"):
        parts.append("-N")
    for key, value in headers.items():
        parts += ["-H", f"{key}: {value}"]
    if method == "POST":
        parts += ["-H", "Content-Type: application/json", "-d", body if isinstance(body, str) else json.dumps(body)]
    return " ".join([*parts, f"http://127.0.0.1:{PORT}{path}"])


def exchange(method: str, path: str, headers: dict[str, str], body: object) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=30)
    data = None if body is None else (body if isinstance(body, str) else json.dumps(body)).encode()
    conn.request(method, path, data, {**headers, **({"Content-Type": "application/json"} if data else {})})
    response = conn.getresponse()
    text = response.read().decode("utf-8", errors="replace")
    lines = [f"HTTP/1.1 {response.status} {response.reason}", *(f"{k}: {v}" for k, v in response.getheaders())]
    conn.close()
    return "\n".join(lines) + "\n\n" + text


def start(server: str, model: str, flags: tuple[str, ...]) -> subprocess.Popen:
    served = ["-m", model]
    if flags == ROUTER:
        folder = Path(tempfile.mkdtemp())
        (folder / "tiny.gguf").symlink_to(Path(model).resolve())
        served, flags = ["--models-dir", str(folder)], ()
    proc = subprocess.Popen([server, *served, "--host", "127.0.0.1", "--port", str(PORT), "-c", "4096",
                             "-np", "4", "-t", "2", "--metrics", "--seed", "42", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            if exchange("GET", "/health", {}, None).startswith("HTTP/1.1 200"):
                return proc
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError("llama-server did not become healthy")


def wait_until_loaded() -> None:
    for _ in range(200):
        if '"value":"loaded"' in exchange("GET", "/models", {}, None):
            return
        time.sleep(0.05)
    raise RuntimeError("the router did not load the model")


def main() -> None:
    server, model, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    out.mkdir(parents=True, exist_ok=True)
    for flags in dict.fromkeys(flags for _, flags, *_ in EXCHANGES):
        proc = start(server, model, flags)
        try:
            for name, wanted, method, path, headers, body in EXCHANGES:
                if wanted != flags:
                    continue
                text = exchange(method, path, headers, body)
                if name == "96-router-load.txt":
                    wait_until_loaded()
                text = re.sub(r'/tmp/tmp\w+/tiny\.gguf', 'models/tiny.gguf', text)
                text = text.replace(model, "models/tiny.gguf").replace(str(Path(model).parent), "models")
                (out / name).write_text(f"### {curl_line(method, path, headers, body)}\n{text}\n")
        finally:
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    main()
