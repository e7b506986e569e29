"""Shared fixtures: tiny models per family and the real SmolLM2 (cached once per run)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("SECATEUR_DATA_ROOT", REPO.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "wikitext2" / "wiki.test.raw").is_file():
        pytest.skip(f"benchmark data not found under {DATA_ROOT}")
    return DATA_ROOT


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M loaded once for all integration tests (fp32, CPU)."""
    from secateur.runtime.loader import load_model

    try:
        return load_model("smollm2-135m", dtype="float32", device="cpu")
    except Exception as e:  # pragma: no cover - only when the package is missing
        pytest.skip(f"SmolLM2 not available: {e}")


def input_ids(vocab: int = 128, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)
