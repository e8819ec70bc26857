"""Output layers padded to a multiple of TP: padding ids get no probability mass, values and gradients
equal the unpadded computation."""

from __future__ import annotations

import pytest
import torch

from minpro_megatron.learner.logprobs import vocab_parallel_logprobs


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_padding_rows_get_no_mass(temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, generator=g)
    weight = torch.randn(33, 16, dtype=torch.float64, generator=g)  # 33 real tokens
    padded = torch.cat([weight, torch.randn(7, 16, dtype=torch.float64, generator=g)])  # 40 rows
    labels = torch.randint(0, 33, (37,), generator=g)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), padded.clone().requires_grad_()
    lp1, ent1 = vocab_parallel_logprobs(h1, w1, labels, temperature=temperature, chunk_size=8)
    lp2, ent2 = vocab_parallel_logprobs(h2, w2, labels, temperature=temperature, chunk_size=8, valid_vocab=33)
    torch.testing.assert_close(lp2, lp1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent2, ent1, rtol=1e-12, atol=1e-12)
    (lp1.sum() + ent1.sum()).backward()
    (lp2.sum() + ent2.sum()).backward()
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w2.grad[:33], w1.grad, rtol=1e-12, atol=1e-12)
    assert torch.all(w2.grad[33:] == 0)
    # without valid_vocab the padding rows would take probability mass
    lp3, _ = vocab_parallel_logprobs(hidden, padded, labels, temperature=temperature)
    assert (lp3 - lp1.detach()).abs().max() > 1e-3
    with pytest.raises(ValueError, match="valid_vocab=33"):
        vocab_parallel_logprobs(hidden, padded, torch.full((37,), 35), valid_vocab=33)
