"""The policy's tokenizer and the three encodings the RL loop needs: a prompt, a response back to text
(cut at the first EOS), and a supervised warm-start target."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from minpro_megatron.config import RunConfig
from minpro_megatron.data.prompts import encode_prompt
from minpro_megatron.data.tasks import Problem
from minpro_megatron.learner.batch import TrainSample

__all__ = ["BUILTIN_TOKENIZER", "load_tokenizer", "Codec"]

BUILTIN_TOKENIZER = "builtin:char"  # checkpoint metadata: the character tokenizer of models/tiny_hf.py


def load_tokenizer(cfg: RunConfig) -> Any:
    """The policy's tokenizer: from model.tokenizer_path / model.hf_path, or the built-in character
    tokenizer of the embedded default."""
    path = cfg.model.tokenizer_path or cfg.model.hf_path
    if path:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
    else:
        from minpro_megatron.models.tiny_hf import build_char_tokenizer

        tok = build_char_tokenizer()
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {path or 'built-in'} has no eos_token; set one (generation stops on it)")
    if len(tok) > cfg.model.vocab_size and not cfg.model.hf_path:
        raise ValueError(f"tokenizer has {len(tok)} tokens but model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
    return tok


class Codec:
    def __init__(self, tokenizer: Any, chat_template: Any) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.eos_id = int(tokenizer.eos_token_id)

    def prompt(self, problem: Problem) -> list[int]:
        return encode_prompt(self.tokenizer, problem.prompt, self.chat_template)

    def response_text(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def sft_sample(self, problem: Problem) -> TrainSample:
        """Prompt + the reference answer + EOS, trained on the answer tokens."""
        prompt = self.prompt(problem)
        answer = list(self.tokenizer.encode(problem.answer, add_special_tokens=False)) + [self.eos_id]
        return TrainSample(torch.tensor(prompt + answer), len(prompt), torch.zeros(len(answer)), 0.0)
