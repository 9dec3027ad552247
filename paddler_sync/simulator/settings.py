"""The simulator's settings (``paddler-sync simulate``): flag names follow llama-server's where one exists, so a
command line written for llama-server starts the simulator too."""

from __future__ import annotations

from paddler_sync.addresses import parse_address
from paddler_sync.setting_spec import S, Setting, section
from paddler_sync.setting_values import (
    address,
    choice,
    count,
    duration,
    fraction,
    model_specs,
    name,
    non_negative_number,
    port,
    positive_count,
    text_value,
)

SIMULATOR_SETTINGS = section("Simulator", (
        Setting("addr", "Where the simulated llama.cpp server listens.", S, address, parse_address("127.0.0.1:8081"),
                metavar="HOST:PORT"),
        Setting("host", "Listen on this address instead of --addr's (llama-server --host).", S, text_value, None),
        Setting("port", "Listen on this port instead of --addr's (llama-server --port).", S, port, None),
        Setting("model", "The model file (llama-server -m): a missing one makes it exit 1 ('failed to load model') as "
                "llama-server does. Names the model unless --alias does.", S, text_value, None, aliases=("-m",)),
        Setting("parallel", "Number of slots (llama-server -np).", S, positive_count, 4, aliases=("-np",)),
        Setting("ctx-size", "Total context in tokens, shared evenly by the slots (llama-server -c).", S,
                positive_count, 4096, aliases=("-c",)),
        Setting("slots", "Serve /slots (llama-server --slots / --no-slots). The simulator enables it by "
                "default, as the recorded server was started.", S, default=True, switch=True),
        Setting("metrics", "Serve /metrics (llama-server --metrics).", S, default=True, switch=True),
        Setting("embeddings", "Run as an embeddings server (pooling mean): /v1/embeddings works, completions "
                "answer 501.", S, default=False, switch=True),
        Setting("api-key", "Require 'Authorization: Bearer KEY' on protected paths, as llama-server --api-key.",
                S, text_value, None, secret=True, metavar="KEY"),
        Setting("alias", "Model id shown in /v1/models and /props (llama-server --alias); with --dialect modern a "
                "comma-separated list, as the 2026 build takes it (the first in sorted order is the id). Unset: "
                "--model's path, or models/simulated.gguf.", S, name, None),
        Setting("tags", "With --dialect modern: tags listed in /v1/models, comma-separated (llama-server --tags).", S,
                text_value, None),
        Setting("router-models", "Serve as a llama.cpp router (2026 build started without -m): these models, "
                "separated by spaces, each ID or ID=ALIAS,ALIAS, each with its own --parallel slots, loaded on "
                "demand. Implies --dialect modern.", S, model_specs, None, metavar="MODELS"),
        Setting("load-time", "Router: how long loading a model takes (its status is 'loading' meanwhile).", S,
                duration, 0.5, metavar="SECONDS"),
        Setting("models-max", "Router: most models loaded at once; loading one more unloads the least recently "
                "used (llama-server --models-max).", S, positive_count, 4),
        Setting("router-autoload", "Router: load a model when a request names it (llama-server --models-autoload).",
                S, default=True, switch=True),
        Setting("dialect", "Which llama.cpp to imitate: b4748 (recorded), modern (after 2025-08: leaner /slots, "
                "/v1/health) or state (b3606-b4026: /slots has 'state' instead of 'is_processing').", S,
                choice("b4748", "modern", "state"), "b4748"),
        Setting("startup-time", "Answer 503 'Loading model' for this long after start, as while a model loads.",
                S, duration, 0.0, metavar="SECONDS"),
        Setting("prefill-ms-per-token", "Prompt processing cost of each uncached prompt token.", S,
                non_negative_number, 0.2, metavar="MS"),
        Setting("decode-tokens-per-second", "Generation speed of one slot; 0 generates without delay.", S,
                non_negative_number, 100.0, metavar="TOKENS"),
        Setting("decode-jitter", "Random spread of each token's delay, as a fraction of it.", S, fraction, 0.0),
        Setting("default-n-predict", "Tokens generated when a request sets no n_predict / max_tokens.", S,
                positive_count, 64),
        Setting("prompt-cache", "Reuse the prefix a slot last processed (llama.cpp's cache_prompt).", S,
                default=True, switch=True),
        Setting("build-info", "Build string reported in /props and system_fingerprint.", S, name, "b4748-c392e509"),
        Setting("seed", "Seed of the generated text and jitter, for reproducible runs.", S, count, 42),
        Setting("stamp-events", "Add a 'stamp_ns' field (time.monotonic_ns()) to each streamed event, for "
                "measuring relay delay.", S, default=False, switch=True),
))
