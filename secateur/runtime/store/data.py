"""Text datasets and token windows: local files first, the standard protocols, seeded sampling.

WikiText-2 is read from the raw files under the data root (see SOURCES.md there) and joined
exactly as `"\\n\\n".join(load_dataset("wikitext", "wikitext-2-raw-v1")[split]["text"])`, so
perplexities match published numbers without touching the hub.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from secateur.recipe.schema import Calibration

DATA_ROOT_ENV = "SECATEUR_DATA_ROOT"
WIKITEXT_NAMES = ("wikitext2", "wikitext2-raw")
FILE_SUFFIXES = (".txt", ".raw", ".jsonl")
SPLITS = {"test": "test", "validation": "valid", "valid": "valid", "train": "train"}


class DataError(ValueError):
    """A dataset, split or token stream that cannot be used; says what was tried."""


def default_data_root() -> Path | None:
    """$SECATEUR_DATA_ROOT, else the repo's sibling shared/data, else ./data (None if neither exists)."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]  # secateur/runtime/store/data.py
    for cand in (repo.parent / "shared" / "data", Path("data")):
        if cand.is_dir():
            return cand
    return None


def _hint() -> str:
    return f"set {DATA_ROOT_ENV} (or pass data_root) to the folder holding wikitext2/wiki.*.raw"


def _resolve_file(ref: str, base_dir: str | Path | None) -> Path:
    p = Path(ref).expanduser()
    if not p.is_absolute():
        cands = ([Path(base_dir) / p] if base_dir is not None else []) + [Path.cwd() / p]
        p = next((c for c in cands if c.is_file()), cands[0])
    if not p.is_file():
        raise DataError(f"dataset: file not found: {p}")
    return p


def resolve_text_source(
    dataset: str,
    split: str,
    data_root: str | Path | None = None,
    base_dir: str | Path | None = None,
) -> Path | str:
    """Map a dataset name to a local file (or an `hf:` spec) before anything is read."""
    if dataset.startswith("hf:"):
        if len(dataset) <= 3:
            raise DataError("dataset: 'hf:' needs a name, as in hf:NAME or hf:NAME:CONFIG")
        return dataset
    if dataset.endswith(FILE_SUFFIXES):
        return _resolve_file(dataset, base_dir)
    if dataset not in WIKITEXT_NAMES:
        raise DataError(
            f"dataset: {dataset!r} is not known; use {', '.join(WIKITEXT_NAMES)}, "
            f"a {'/'.join(FILE_SUFFIXES)} file or hf:NAME[:CONFIG]"
        )
    if split not in SPLITS:
        raise DataError(f"dataset {dataset}: split {split!r} is not one of {', '.join(SPLITS)}")
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    if root is None:
        raise DataError(f"dataset {dataset} split {split}: no data root found; {_hint()}")
    path = root / "wikitext2" / f"wiki.{SPLITS[split]}.raw"
    if not path.is_file():
        extra = " (the train split is not shipped with the benchmark data)" if split == "train" else ""
        raise DataError(f"dataset {dataset} split {split}: {path} not found{extra}; {_hint()}")
    return path


def wikitext_rows(text: str) -> list[str]:
    """The rows HF's wikitext loader yields: one per line, whitespace-only lines as ""."""
    return [line if line.strip() else "" for line in text.splitlines(True)]


def iter_jsonl(path: Path, prefix: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, parsed row) of every non-blank line; a malformed line fails naming file:line."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{prefix}{path}:{n}: not valid JSON ({e.msg})") from e


def _jsonl_texts(path: Path) -> list[str]:
    out: list[str] = []
    for n, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{path}:{n}: row has no string 'text' field")
        out.append(row["text"])
    return out


def load_text(
    dataset: str,
    split: str,
    data_root: str | Path | None = None,
    base_dir: str | Path | None = None,
) -> str:
    """The whole split as one string, joined the way the standard perplexity protocol does."""
    src = resolve_text_source(dataset, split, data_root, base_dir)
    if isinstance(src, str):
        from datasets import load_dataset

        name, _, config = src[3:].partition(":")
        hf_split = "validation" if split == "valid" else split
        return "\n\n".join(load_dataset(name, config or None, split=hf_split)["text"])
    try:
        if src.suffix == ".jsonl":
            return "\n\n".join(_jsonl_texts(src))
        text = src.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"dataset {src}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if src.suffix == ".raw":
        return "\n\n".join(wikitext_rows(text))
    return text


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids [1, N] of `text` from any HF-like tokenizer (`tokenizer(text).input_ids`)."""
    enc = tokenizer(text)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc.input_ids
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise DataError(f"tokenizer returned input_ids of shape {tuple(ids.shape)}, expected [N] or [1, N]")
    return ids


def _flat(tokens: torch.Tensor) -> torch.Tensor:
    if tokens.dim() == 2 and tokens.shape[0] == 1:
        return tokens[0]
    if tokens.dim() != 1:
        raise DataError(f"token stream must be [N] or [1, N], got {tuple(tokens.shape)}")
    return tokens


def split_tokens(tokens: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous (head, tail) parts, head holding `fraction` of the tokens, so windows drawn
    from each are disjoint (e.g. calibration from the head, a search's held-out check from the tail)."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"split fraction must be in (0, 1), got {fraction}")
    flat = _flat(tokens)
    k = int(round(flat.numel() * fraction))
    return flat[:k].unsqueeze(0), flat[k:].unsqueeze(0)


def calibration_windows(tokens: torch.Tensor, n_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`n_samples` random windows [n_samples, seqlen], deterministic for a seed (GPTQ-style sampling)."""
    flat = _flat(tokens)
    n = flat.numel()
    if n_samples < 1 or seqlen < 1:
        raise DataError(f"calibration needs n_samples >= 1 and seqlen >= 1, got {n_samples}, {seqlen}")
    if n < seqlen + 1:
        raise DataError(f"calibration set has {n} tokens, fewer than seqlen={seqlen} + 1")
    g = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - seqlen, (n_samples,), generator=g)
    return torch.stack([flat[s : s + seqlen] for s in starts.tolist()])


STATS_FRACTION = 0.9  # calibration statistics come from this head of the text; the tail is held out


def statistics_split(
    tokens: torch.Tensor, n_samples: int, seqlen: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiler's calibration windows (random windows of the first 90% of the text) and the
    untouched tail they never overlap (held-out tokens for quality proxies and searches)."""
    head, tail = split_tokens(tokens, STATS_FRACTION)
    return calibration_windows(head, n_samples, seqlen, seed), tail


def eval_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start, [N // seqlen, seqlen] (the tail is dropped)."""
    flat = _flat(tokens)
    n = flat.numel() // seqlen if seqlen > 0 else 0
    if n == 0:
        raise DataError(f"evaluation set has {flat.numel()} tokens, fewer than seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, max(int(max_windows), 0))
    return flat[: n * seqlen].reshape(n, seqlen)


@dataclass(frozen=True)
class CalibrationWindows:
    """A recipe's statistics windows and the held-out windows disjoint from them."""

    calib: torch.Tensor  # [n_samples, seqlen]
    heldout: torch.Tensor  # [windows, heldout seqlen]


def calibration_tokens(cal: Calibration, tokenizer: Any, base_dir: str | Path | None) -> torch.Tensor:
    """Token ids [1, N] of a recipe's `calibration` text."""
    return tokenize_text(tokenizer, load_text(cal.dataset, cal.split, cal.data_root, base_dir))


def recipe_windows(
    cal: Calibration,
    tokens: torch.Tensor,
    heldout_seqlen: int | None = None,
    heldout_windows: int | None = None,
) -> CalibrationWindows:
    """The one way a recipe's `calibration` becomes windows: statistics from random windows of the
    first 90% of the text, held-out windows from the tail (`calibration.heldout_*` unless given)."""
    seqlen = min(cal.seqlen, cal.heldout_seqlen) if heldout_seqlen is None else heldout_seqlen
    windows = cal.heldout_windows if heldout_windows is None else heldout_windows
    try:
        calib, tail = statistics_split(tokens, cal.n_samples, cal.seqlen, cal.seed)
        return CalibrationWindows(calib, eval_windows(tail, seqlen, windows))
    except DataError as e:  # an empty or short text: say which one
        raise DataError(f"calibration.dataset {cal.dataset}: {e}") from e
