"""JSON bodies in llama.cpp's shapes, field for field and in the same order as the captures.

``dialect`` picks the server generation: ``b4748`` (tests/captures), ``modern`` (the 2026 build of
tests/captures/2026: lean /slots, more /props, other metrics) or ``state`` (b3606-b4026: ``state`` 0/1
instead of ``is_processing``, generation settings flat in each slot).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
# The 2026 build's generation settings, in its order: /props and /slots show the first list, a finished
# completion's generation_settings the second (request-specific fields among them).
MODERN_SLOT_PARAMS: dict[str, Any] = {
    "seed": 4294967295, "temperature": 0.800000011920929, "dynatemp_range": 0.0, "dynatemp_exponent": 1.0,
    "top_k": 40, "top_p": 0.949999988079071, "min_p": 0.05000000074505806, "top_n_sigma": -1.0,
    "xtc_probability": 0.0, "xtc_threshold": 0.10000000149011612, "typical_p": 1.0, "repeat_last_n": 64,
    "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "dry_multiplier": 0.0,
    "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": 64, "mirostat": 0, "mirostat_tau": 5.0,
    "mirostat_eta": 0.10000000149011612, "adaptive_target": -1.0, "adaptive_decay": 0.8999999761581421,
    "max_tokens": -1, "n_predict": -1, "n_keep": 0, "n_discard": 0, "ignore_eos": False, "stream": False,
    "n_probs": 0, "min_keep": 0, "chat_format": "Content-only", "reasoning_format": "none",
    "reasoning_in_content": False, "generation_prompt": "",
    "samplers": ["penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc", "temperature"],
    "speculative.types": "none", "timings_per_token": False, "post_sampling_probs": False,
    "backend_sampling": False, "lora": [],
}
_MODERN_REQUEST_EXTRA: dict[str, dict[str, Any]] = {  # after the key named, in a completion's generation_settings
    "dry_penalty_last_n": {"dry_sequence_breakers": ["\n", ":", "\"", "*"]},
    "adaptive_decay": {"stop": []},
    "stream": {"logit_bias": []},
    "min_keep": {"grammar": "", "grammar_lazy": False, "grammar_triggers": [], "preserved_tokens": []},
}

CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
                 "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                 "{% endif %}")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               500: "server_error", 501: "not_supported_error", 503: "unavailable_error"}


def dumps(obj: Any) -> bytes:
    """llama.cpp's nlohmann::json output: compact, UTF-8 unescaped."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def error_body(code: int, message: str, message_first: bool = False) -> dict[str, Any]:
    """``message_first``: the 2026 build's HTTP layer (404, 401) orders the fields message, type, code."""
    if message_first:
        return {"error": {"message": message, "type": ERROR_TYPES[code], "code": code}}
    return {"error": {"code": code, "message": message, "type": ERROR_TYPES[code]}}


def request_params(n_predict: int, stream: bool, stop: list[str] | None = None,
                   dialect: str = "b4748") -> dict[str, Any]:
    if dialect != "modern":
        params = dict(DEFAULT_PARAMS)
        params.update(n_predict=n_predict, max_tokens=n_predict, stream=stream, stop=list(stop or []))
        return params
    params = {}
    for key, value in MODERN_SLOT_PARAMS.items():
        params[key] = value
        params.update(_MODERN_REQUEST_EXTRA.get(key, {}))
    params.update(n_predict=n_predict, max_tokens=n_predict, stream=stream, stop=list(stop or []))
    return params


def slot_json(slot: Slot, dialect: str) -> dict[str, Any]:
    if dialect == "state":
        return _legacy_slot_json(slot)
    if dialect == "modern":
        return _modern_slot_json(slot)
    body: dict[str, Any] = {
        "id": slot.id, "id_task": slot.id_task, "n_ctx": slot.n_ctx, "speculative": False,
        "is_processing": slot.is_processing, "non_causal": False, "params": dict(slot.params or DEFAULT_PARAMS),
    }
    next_token: dict[str, Any] = {"has_next_token": slot.has_next_token, "has_new_line": slot.has_new_line,
                                  "n_remain": slot.n_remain, "n_decoded": slot.n_decoded}
    if dialect == "b4748":
        body["prompt"] = slot.prompt
        next_token["stopping_word"] = slot.stopping_word
    body["next_token"] = next_token
    return body


def _modern_slot_json(slot: Slot) -> dict[str, Any]:
    """2026: four fields for a slot that never ran a task; its last task's figures once it has."""
    body: dict[str, Any] = {"id": slot.id, "n_ctx": slot.n_ctx, "speculative": False,
                            "is_processing": slot.is_processing}
    if slot.id_task < 0:
        return body
    body.update({"id_task": slot.id_task, "n_prompt_tokens": len(slot.cache) - slot.n_decoded,
                 "n_prompt_tokens_processed": len(slot.cache) - slot.n_decoded, "n_prompt_tokens_cache": 0,
                 "params": {k: v for k, v in (slot.params or {}).items() if k in MODERN_SLOT_PARAMS},
                 "next_token": [{"has_next_token": slot.has_next_token, "has_new_line": slot.has_new_line,
                                 "n_remain": slot.n_remain, "n_decoded": slot.n_decoded}]})
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
               endpoints: dict[str, bool], is_sleeping: bool = False) -> dict[str, Any]:
    if dialect == "modern":
        return _modern_props_json(slot, total_slots, model, build_info, endpoints, is_sleeping)
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
    return body


def _modern_props_json(slot: Slot, total_slots: int, model: str, build_info: str, endpoints: dict[str, bool],
                       is_sleeping: bool) -> dict[str, Any]:
    return {
        "default_generation_settings": {"params": dict(MODERN_SLOT_PARAMS), "n_ctx": slot.n_ctx},
        "total_slots": total_slots, "model_alias": model, "model_ftype": "all F32", "model_path": model,
        "modalities": {"vision": False, "video": False, "audio": False},
        "media_marker": "<__media_simulated0000000000000000000000000__>",
        **{f"endpoint_{name}": enabled for name, enabled in endpoints.items()},
        "ui": True, "ui_settings": {}, "chat_template": CHAT_TEMPLATE,
        "chat_template_caps": {"supports_object_arguments": False, "supports_parallel_tool_calls": False,
                               "supports_preserve_reasoning": False, "supports_string_content": True,
                               "supports_system_role": True, "supports_tool_calls": False,
                               "supports_tools": False, "supports_typed_content": False},
        "bos_token": "<s>", "eos_token": "</s>", "build_info": build_info, "is_sleeping": is_sleeping,
        "cors_proxy_enabled": False,
    }


def models_json(model: str, created: int, n_ctx_train: int, n_ctx: int = 0, dialect: str = "b4748",
                aliases: tuple[str, ...] = (), tags: tuple[str, ...] = ()) -> dict[str, Any]:
    meta = {"vocab_type": 1, "n_vocab": 32000, "n_ctx_train": n_ctx_train, "n_embd": 128, "n_params": 8520320,
            "size": 34081280}
    if dialect != "modern":
        return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                            "owned_by": "llamacpp", "meta": meta}]}
    ollama_style = {"name": model, "model": model, "modified_at": "", "size": "", "digest": "", "type": "model",
                    "description": "", "tags": [""], "capabilities": ["completion"], "parameters": "",
                    "details": {"parent_model": "", "format": "gguf", "family": "", "families": [""],
                                "parameter_size": "", "quantization_level": ""}}
    return {"models": [ollama_style], "object": "list", "data": [{
        "id": model, "aliases": list(aliases or (model,)), "tags": list(tags), "object": "model", "created": created,
        "owned_by": "llamacpp",
        "meta": {"vocab_type": 1, "n_vocab": 32000, "n_ctx": n_ctx, **{k: v for k, v in meta.items()
                                                                        if k != "vocab_type" and k != "n_vocab"},
                 "ftype": "all F32"},
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


_MODERN_METRICS = (  # the 2026 build: no KV-cache gauges, speculative decoding counters, busy slots last
    *_METRICS[:5],
    ("n_tokens_max", "counter", "Largest observed n_tokens."),
    ("spec_decode_num_draft_tokens_total", "counter", "Total draft tokens generated"),
    ("spec_decode_num_accepted_tokens_total", "counter", "Total draft tokens accepted by the target model"),
    ("spec_decode_num_drafts_total", "counter", "Total speculative decoding verification steps"),
    *_METRICS[6:8],
    *_METRICS[10:12],
    ("n_busy_slots_per_decode", "gauge", "Average number of busy slots per llama_decode() call"),
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
    metrics: Sequence[tuple[str, str, str]] = _METRICS
    if dialect == "modern":
        metrics = _MODERN_METRICS
        values.update(n_tokens_max=kv_tokens, spec_decode_num_draft_tokens_total=0,
                      spec_decode_num_accepted_tokens_total=0, spec_decode_num_drafts_total=0)
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
