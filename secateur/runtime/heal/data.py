"""The text healing trains on. By default the dense model writes it (sampled from the start of
a document), so healing needs no corpus and reads nothing from any evaluation set; a local
file or a non-test split works too. Sequences are made in fixed-size, separately seeded batches,
so a smaller token budget is always a prefix of a larger one (and of its cache)."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from secateur.runtime.store.atomic import replacing

GEN_BATCH = 64  # sequences sampled together (per-step overhead dominates small batches); fixed, so every batch is reproducible on its own


def start_token(tokenizer: object) -> int:
    """The token a document starts with: BOS, else EOS (GPT-style document separator)."""
    for name in ("bos_token_id", "eos_token_id"):
        tid = getattr(tokenizer, name, None)
        if isinstance(tid, int):
            return tid
    raise ValueError("heal.data: the tokenizer has neither a BOS nor an EOS token to start sampling from")


@torch.no_grad()
def sample_batch(
    model: nn.Module, start: int, n: int, seqlen: int, temperature: float, seed: int
) -> torch.Tensor:
    """n sequences of seqlen tokens sampled from the model (start token first), with KV cache."""
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.full((n, 1), start, dtype=torch.long, device=device)
    # transformers 5.x renamed `past_key_values` to `cache`; take whichever this version has
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True)
    seq = [ids.cpu()]
    for _ in range(seqlen - 1):
        probs = torch.softmax(out.logits[:, -1].float().cpu() / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        seq.append(nxt)
        out = model(input_ids=nxt.to(device), use_cache=True, **{name: out[name]})
    return torch.cat(seq, dim=1)


def self_generated(
    model: nn.Module,
    tokenizer: object,
    n_seq: int,
    seqlen: int,
    temperature: float,
    seed: int,
    cache: Path | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """n_seq sampled sequences [n_seq, seqlen]; batches already in `cache` (a .pt of earlier
    batches for the same model and settings) are reused, new ones appended."""
    done = torch.load(cache, weights_only=True) if cache is not None and cache.is_file() else None
    have = [] if done is None else list(done.split(GEN_BATCH))
    start = start_token(tokenizer)
    n_batches = -(-n_seq // GEN_BATCH)
    was_training = model.training
    model.eval()
    bar = tqdm(range(len(have), n_batches), desc="heal: sampling text", unit="batch", disable=not progress)
    for b in bar:
        have.append(sample_batch(model, start, GEN_BATCH, seqlen, temperature, seed * 100003 + b))
        if cache is not None:  # kept as it grows: a killed run resumes sampling where it stopped
            cache.parent.mkdir(parents=True, exist_ok=True)
            with replacing(cache) as tmp:
                torch.save(torch.cat(have), tmp)
    model.train(was_training)
    return torch.cat(have)[:n_seq]


def text_sequences(tokens: torch.Tensor, n_seq: int, seqlen: int, seed: int) -> tuple[torch.Tensor, int]:
    """n_seq windows of a token stream: the non-overlapping windows in a seeded order, repeated
    (a new order each pass) when the text holds fewer. Returns the windows and the passes made."""
    flat = tokens.reshape(-1)
    n_win = flat.numel() // seqlen
    if n_win == 0:
        raise ValueError(f"heal.data: the text has {flat.numel()} tokens, fewer than one window of {seqlen}")
    windows = flat[: n_win * seqlen].view(n_win, seqlen)
    gen = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n_win, generator=gen) for _ in range(-(-n_seq // n_win))])[:n_seq]
    return windows[order], -(-n_seq // n_win)
