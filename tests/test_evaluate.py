"""Perplexity is exp of the mean next-token cross-entropy over windows."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from secateur.graph.adapters import adapter_for
from secateur.runtime.measure.evaluate import perplexity, window_nll
from secateur.testing import tiny_model

from .conftest import input_ids


def test_perplexity_is_finite_and_above_one() -> None:
    model = tiny_model("llama")
    ppl = perplexity(model, input_ids(batch=3, seq=16), batch_size=2)
    assert math.isfinite(ppl) and ppl > 1.0


def test_matches_manual_cross_entropy() -> None:
    model = tiny_model("qwen3")
    window = input_ids(batch=1, seq=20, seed=3)
    with torch.no_grad():
        logits = model(window).logits[0]
    manual = math.exp(F.cross_entropy(logits[:-1], window[0, 1:]).item())
    assert perplexity(model, window) == pytest.approx(manual, rel=1e-5)


def test_batching_does_not_change_the_mean() -> None:
    model = tiny_model("opt")
    windows = input_ids(batch=5, seq=12, seed=1)
    assert window_nll(model, windows, batch_size=1) == pytest.approx(window_nll(model, windows, batch_size=2))


def test_zeroed_mlp_changes_perplexity() -> None:
    model = tiny_model("llama")
    windows = input_ids(batch=2, seq=16)
    before = perplexity(model, windows)
    adapter = adapter_for(model.config)
    with torch.no_grad():
        model.get_submodule(f"{adapter.layer_prefix(0)}.{adapter.mlp_out}").weight.zero_()
    assert perplexity(model, windows) != pytest.approx(before, rel=1e-6)


def test_rejects_unusable_windows() -> None:
    with pytest.raises(ValueError, match="seqlen >= 2"):
        perplexity(tiny_model("llama"), torch.zeros(2, 1, dtype=torch.long))
