"""Prompt text -> token ids, with the tokenizer's chat template when ``data.chat_template`` is on.

A chat-format dataset row stores its messages as a JSON list (data/dataset.py); a plain prompt becomes one
user message. Without a chat template the prompt is BOS + its tokens (the embedded default).
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["encode_prompt"]


def _messages(prompt: str) -> list[dict[str, str]]:
    if prompt.startswith("["):
        try:
            msgs = json.loads(prompt)
        except json.JSONDecodeError:
            msgs = None
        if isinstance(msgs, list) and all(isinstance(m, dict) and "content" in m for m in msgs):
            return msgs
    return [{"role": "user", "content": prompt}]


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool = False) -> list[int]:
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "data.chat_template=true but the tokenizer has no chat template (tokenizer_config.json "
                "'chat_template'); use an instruct model's tokenizer or set data.chat_template=false"
            )
        text = tokenizer.apply_chat_template(_messages(prompt), add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + list(tokenizer.encode(prompt, add_special_tokens=False))
