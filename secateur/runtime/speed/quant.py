"""GGUF weight types and the row lengths each can hold.

llama.cpp quantises a matrix row by row in blocks along the input dimension: 32 values for q8_0
and q4_0, 256 for the K-quants. A pruned width that is not a whole number of blocks cannot take
the type; llama.cpp's own quantiser then silently falls back to another type for that tensor, so
Secateur refuses such widths instead (or picks `budget.multiple_of` so they never occur).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")
# q4_k_m is written as f16 by Secateur, then quantised by llama.cpp's own quantiser
LLAMA_QUANTISED = {"q4_k_m": 15}  # llama_ftype LLAMA_FTYPE_MOSTLY_Q4_K_M
BLOCK = {"f32": 1, "f16": 1, "bf16": 1, "q8_0": 32, "q4_0": 32, "q4_k_m": 256}


class QuantWidthError(ValueError):
    """A pruned width the chosen GGUF type cannot hold."""


def row_block(outtype: str | None) -> int:
    """Values per quantisation block along a row (1 for float types and no quantisation)."""
    if outtype is None:
        return 1
    if outtype not in BLOCK:
        raise ValueError(f"GGUF type {outtype!r} is not one of {', '.join(OUTTYPES)}")
    return BLOCK[outtype]


def check_row_lengths(rows: dict[str, int], dense_rows: dict[str, int], outtype: str) -> None:
    """Refuse a row length pruning made that `outtype`'s blocks cannot hold (lengths the dense model
    already has are left to llama.cpp's fallback, as for the dense model itself)."""
    b = row_block(outtype)
    for name, n in rows.items():
        if n % b and dense_rows.get(name, 0) % b == 0:
            lo, hi = n // b * b, -(-n // b) * b
            raise QuantWidthError(
                f"{name}: rows of {n} values are not whole {b}-value blocks of {outtype}; prune to a width "
                f"that is a multiple of {b} ({lo} or {hi}: budget.multiple_of: auto with target.quant: "
                f"{outtype}, or budget.multiple_of: {b}), or export a float type (f16, bf16)"
            )


def encode_matrix(data: np.ndarray, outtype: str) -> tuple[np.ndarray, Any]:
    """A float32 matrix in a GGUF type the `gguf` package writes (K-quants are written as f16 and
    quantised afterwards by llama.cpp); rows must be whole blocks (`check_row_lengths`)."""
    import gguf

    q = gguf.GGMLQuantizationType
    qtype = {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0, "q4_0": q.Q4_0}.get(outtype, q.F16)
    if data.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        raise QuantWidthError(f"rows of {data.shape[-1]} values cannot be written as {outtype}")
    return gguf.quants.quantize(data, qtype), qtype


def write_quantised(path: Path, outtype: str, write_f16: Callable[[Path], Any]) -> None:
    """Write `path` in a type only llama.cpp's quantiser makes (LLAMA_QUANTISED): `write_f16` writes
    an f16 GGUF beside it, llama.cpp converts that, and the f16 file is removed whatever happens."""
    f16 = path.with_name(path.name + ".f16")
    try:
        write_f16(f16)
        quantise_with_llama(str(f16), str(path), outtype)
    finally:
        f16.unlink(missing_ok=True)


def quantise_with_llama(src: str, dst: str, outtype: str, threads: int | None = None) -> None:
    """llama.cpp's own quantiser (shipped in llama-cpp-python) for the types gguf-py cannot write."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_QUANTISED[outtype]
    params.nthread = int(threads or 0)
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama.cpp could not quantise {src} to {outtype} (code {rc})")
