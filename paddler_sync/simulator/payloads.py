"""JSON bodies in llama.cpp's shapes, field for field and in the same order as the captures.

``dialect`` picks the server generation: ``b4748`` (recorded), ``modern`` (after PR #15630: no
prompt, stop strings or grammar in /slots) or ``state`` (b3606-b4026: ``state`` 0/1 instead of
``is_processing``, generation settings flat in each slot).
"""

from __future__ import annotations

import json
from typing import Any

from paddler_sync.simulator.engine import Counters, Slot

DEFAULT_PARAMS: dict[str, Any] = {
    "n_predict": -1, "seed": 4294967295, "temperature": 0.800000011920929, "dynatemp_range": 0.0,
    "dynatemp_exponent": 1.0, "top_k": 40, "top_p": 0.949999988079071, "min_p": 0.05000000074505806,
    "xtc_probability": 0.0, "xtc_threshold": 0.10000000149011612, "typical_p": 1.0, "repeat_last_n": 64,
    "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "dry_multiplier": 0.0,
    "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 4096,
    "dry_sequence_breakers": ["\n", ":", "\"", "*"], "mirostat": 0, "mirostat_tau": 5.0,
    "mirostat_eta": 0.10000000149011612, "stop": [], "max_tokens": -1, "n_keep": 0, "n_discard": 0,
    "ignore_eos": False, "stream": True, "logit_bias": [], "n_probs": 0, "min_keep": 0, "grammar": "",
    "grammar_trigger_words": [], "grammar_trigger_tokens": [], "preserved_tokens": [],
    "chat_format": "Content-only",
    "samplers": ["penalties", "dry", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"],
    "speculative.n_max": 16, "speculative.n_min": 0, "speculative.p_min": 0.75, "timings_per_token": False,
    "post_sampling_probs": False, "lora": [],
}
_MODERN_DROPPED = ("stop", "grammar", "grammar_trigger_words", "grammar_trigger_tokens", "preserved_tokens")

CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
                 "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               500: "server_error", 501: "not_supported_error", 503: "unavailable_error"}


def dumps(obj: Any) -> bytes:
    """llama.cpp's nlohmann::json output: compact, UTF-8 unescaped."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def error_body(code: int, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "type": ERROR_TYPES[code]}}


def request_params(n_predict: int, stream: bool, stop: list[str] | None = None) -> dict[str, Any]:
    params = dict(DEFAULT_PARAMS)
    params.update(n_predict=n_predict, max_tokens=n_predict, stream=stream, stop=list(stop or []))
    return params


def slot_params(slot: Slot, dialect: str) -> dict[str, Any]:
    params = dict(slot.params or DEFAULT_PARAMS)
    if dialect == "modern":
        for key in _MODERN_DROPPED:
            params.pop(key, None)
    return params


def slot_json(slot: Slot, dialect: str) -> dict[str, Any]:
    if dialect == "state":
        return _legacy_slot_json(slot)
    body: dict[str, Any] = {
        "id": slot.id, "id_task": slot.id_task, "n_ctx": slot.n_ctx, "speculative": False,
        "is_processing": slot.is_processing, "non_causal": False, "params": slot_params(slot, dialect),
    }
    next_token: dict[str, Any] = {"has_next_token": slot.has_next_token, "has_new_line": slot.has_new_line,
                                  "n_remain": slot.n_remain, "n_decoded": slot.n_decoded}
    if dialect == "b4748":
        body["prompt"] = slot.prompt
        next_token["stopping_word"] = slot.stopping_word
    body["next_token"] = next_token
    return body


def _legacy_slot_json(slot: Slot) -> dict[str, Any]:
    """b3606-b4026: generation settings flat in the slot, ``state`` 0 (idle) or 1 (processing)."""
    body: dict[str, Any] = {"n_ctx": slot.n_ctx, **(slot.params or DEFAULT_PARAMS)}
    body.update({
        "id": slot.id, "id_task": slot.id_task, "state": 1 if slot.is_processing else 0, "prompt": slot.prompt,
        "next_token": {"has_next_token": slot.has_next_token, "n_remain": slot.n_remain,
                       "n_decoded": slot.n_decoded, "stopped_eos": False, "stopped_word": False,
                       "stopped_limit": not slot.has_next_token, "stopping_word": slot.stopping_word},
    })
    return body


def props_json(slot: Slot, total_slots: int, model: str, build_info: str, dialect: str,
               endpoints: dict[str, bool]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "default_generation_settings": slot_json(slot, "b4748" if dialect == "state" else dialect),
        "total_slots": total_slots, "model_path": model, "chat_template": CHAT_TEMPLATE,
        "bos_token": "<s>", "eos_token": "</s>", "build_info": build_info,
    }
    if dialect == "state":
        body["default_generation_settings"] = {"n_ctx": slot.n_ctx, "model": model, **DEFAULT_PARAMS}
        body.pop("bos_token")
        body.pop("eos_token")
        body.pop("build_info")
    if dialect == "modern":
        body["modalities"] = {"vision": False, "audio": False}
        body.update({f"endpoint_{name}": enabled for name, enabled in endpoints.items()})
    return body


def models_json(model: str, created: int, n_ctx_train: int) -> dict[str, Any]:
    return {"object": "list", "data": [{
        "id": model, "object": "model", "created": created, "owned_by": "llamacpp",
        "meta": {"vocab_type": 1, "n_vocab": 32000, "n_ctx_train": n_ctx_train, "n_embd": 128,
                 "n_params": 8520320, "size": 34081280},
    }]}


_METRICS = (
    ("prompt_tokens_total", "counter", "Number of prompt tokens processed."),
    ("prompt_seconds_total", "counter", "Prompt process time"),
    ("tokens_predicted_total", "counter", "Number of generation tokens processed."),
    ("tokens_predicted_seconds_total", "counter", "Predict process time"),
    ("n_decode_total", "counter", "Total number of llama_decode() calls"),
    ("n_busy_slots_per_decode", "counter", "Average number of busy slots per llama_decode() call"),
    ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s."),
    ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s."),
    ("kv_cache_usage_ratio", "gauge", "KV-cache usage. 1 means 100 percent usage."),
    ("kv_cache_tokens", "gauge", "KV-cache tokens."),
    ("requests_processing", "gauge", "Number of requests processing."),
    ("requests_deferred", "gauge", "Number of requests deferred."),
)


def metrics_text(c: Counters, processing: int, deferred: int, kv_tokens: int, n_ctx: int,
                 dialect: str) -> bytes:
    values = {
        "prompt_tokens_total": c.prompt_tokens_total,
        "prompt_seconds_total": round(c.prompt_seconds_total, 3),
        "tokens_predicted_total": c.tokens_predicted_total,
        "tokens_predicted_seconds_total": round(c.tokens_predicted_seconds_total, 3),
        "n_decode_total": c.n_decode_total,
        "n_busy_slots_per_decode": round(c.n_busy_slots_total / c.n_decode_total, 6) if c.n_decode_total else 0,
        "prompt_tokens_seconds": _rate(c.prompt_tokens_total, c.prompt_seconds_total),
        "predicted_tokens_seconds": _rate(c.tokens_predicted_total, c.tokens_predicted_seconds_total),
        "kv_cache_usage_ratio": round(kv_tokens / n_ctx, 6) if n_ctx else 0,
        "kv_cache_tokens": kv_tokens,
        "requests_processing": processing,
        "requests_deferred": deferred,
    }
    metrics = list(_METRICS)
    if dialect == "modern":
        metrics.insert(6, ("n_tokens_max", "counter", "Largest observed n_tokens."))
        values["n_tokens_max"] = kv_tokens
    lines = []
    for name, kind, help_text in metrics:
        lines += [f"# HELP llamacpp:{name} {help_text}", f"# TYPE llamacpp:{name} {kind}",
                  f"llamacpp:{name} {_number(values[name])}"]
    return ("\n".join(lines) + "\n").encode()


def _rate(tokens: int, seconds: float) -> float:
    return round(tokens / seconds, 3) if seconds else 0


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def timings_json(prompt_n: int, prompt_s: float, predicted_n: int, predicted_s: float) -> dict[str, float]:
    prompt_ms, predicted_ms = prompt_s * 1000, predicted_s * 1000
    return {
        "prompt_n": prompt_n, "prompt_ms": round(prompt_ms, 3),
        "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
        "prompt_per_second": 1000 * prompt_n / prompt_ms if prompt_ms else 0.0,
        "predicted_n": predicted_n, "predicted_ms": round(predicted_ms, 3),
        "predicted_per_token_ms": predicted_ms / predicted_n if predicted_n else 0.0,
        "predicted_per_second": 1000 * predicted_n / predicted_ms if predicted_ms else 0.0,
    }
