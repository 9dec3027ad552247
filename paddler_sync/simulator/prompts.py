"""What a simulated request asks for: prompts from each API's body, and llama.cpp's context shift."""

from __future__ import annotations

from typing import Any

from paddler_sync.simulator.http import HttpError


def truncate_prompt(tokens: list[int], n_ctx: int) -> tuple[list[int], bool]:
    """llama.cpp's context shift for a prompt that does not fit: drop whole blocks of half the context."""
    if len(tokens) < n_ctx:
        return tokens, False
    block = max(1, n_ctx // 2)
    erased = (len(tokens) - block) // block
    return tokens[erased * block:], True


def responses_input(body: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI Responses' ``input``: a string (one user message) or a list of messages."""
    given = body.get("input")
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if isinstance(given, list) and given and all(isinstance(m, dict) for m in given):
        return given
    raise HttpError(400, "'input' is required")


def anthropic_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """Anthropic's ``system`` and ``messages`` (content as text or text blocks) as chat messages."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise HttpError(500, "'messages' is required")  # sic: the 2026 build answers 500 here
    system = body.get("system")
    out = [{"role": "system", "content": system}] if isinstance(system, str) else []
    for message in messages:
        content = message.get("content", "")
        if isinstance(content, list):
            content = "".join(block.get("text", "") for block in content if isinstance(block, dict))
        out.append({"role": message.get("role", "user"), "content": content})
    return out


def messages_of(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise HttpError(400, "'messages' is required and must be an array of objects")
    return messages


def chatml(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    text = "".join(f"<|im_start|>{m.get('role', 'user')}\n{m.get('content', '')}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")
