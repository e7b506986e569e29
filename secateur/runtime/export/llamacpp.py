"""Run a GGUF in llama.cpp itself (llama-cpp-python): logits, perplexity, speed, in a child process.

This is the check that an export is right: llama.cpp's own logits on the same token ids as
Secateur's PyTorch evaluation, and the engine `secateur speed` and the width sweep time. Each model
runs in its own child process (`llamacpp_worker.py`, which imports llama_cpp only): llama-cpp-python
0.3.36 segfaults on some CPUs when it prefills a quantised GGUF, and two models open in one process
crash libllama; a child that dies is reported as `EngineUnavailable` naming the file, its type and
the signal, and the user's process carries on. The child loads the model once and serves every
request (timing rounds, logits) itself. llama-cpp-python is optional (`pip install secateur[llama]`);
`available()` says why it cannot be used.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from secateur.runtime.store.formats import EngineUnavailable

WORKER = Path(__file__).with_name("llamacpp_worker.py")
START_TIMEOUT_S = 300  # loading a model: minutes for a large one on a slow disk, never forever


def available() -> str | None:
    """None when llama_cpp imports, else the reason it does not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # a missing package or a broken native library both mean "cannot run"
        return f"llama-cpp-python is not importable ({type(e).__name__}: {e})"
    return None


def gguf_type(path: str | Path) -> str:
    """The weight type of a GGUF, for messages: `general.file_type` (f16, q8_0, q4_k_m...) where the
    file declares it, else the commonest type of its matrices."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        field = reader.get_field("general.file_type")
        if field is not None:
            name = gguf.LlamaFileType(int(field.contents())).name
            return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
        types = [t.tensor_type.name.lower() for t in reader.tensors if len(t.shape) >= 2]
        return max(set(types), key=types.count) if types else "?"
    except Exception:  # a message helper: an unreadable header just leaves the type out
        return "?"


class LlamaProcess:
    """One GGUF open in llama.cpp in a child process, loaded once (`n_batch`/`n_ubatch` default to
    `n_ctx`; `all_logits` False computes the LM head for the last position only, as a server does)."""

    def __init__(
        self,
        path: str | Path,
        n_ctx: int,
        threads: int | None = None,
        all_logits: bool = True,
        n_batch: int | None = None,
        n_ubatch: int | None = None,
    ) -> None:
        self.path = Path(path)
        cfg = {
            "path": str(self.path),
            "n_ctx": int(n_ctx),
            "n_batch": int(n_batch or n_ctx),
            "n_ubatch": int(n_ubatch or n_batch or n_ctx),
            "threads": int(threads or min(os.cpu_count() or 1, 2)),
            "logits_all": bool(all_logits),
        }
        self._err = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            [sys.executable, str(WORKER), json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
        )
        head = self._read("load")
        if "error" in head:
            self.close()
            raise EngineUnavailable(f"llama.cpp cannot load {self.path}: {head['error']}")

    def _read(self, what: str) -> dict[str, Any]:
        line = self._proc.stdout.readline() if self._proc.stdout else b""
        if line:
            return json.loads(line)
        rc = self._proc.wait(timeout=START_TIMEOUT_S)
        raise EngineUnavailable(self._crash(rc, what))

    def _crash(self, rc: int, what: str) -> str:
        why = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit code {rc}"
        self._err.seek(0)
        tail = self._err.read().decode(errors="replace").strip().splitlines()
        last = f" ({tail[-1][:200]})" if tail else ""
        kind = gguf_type(self.path)
        hint = (
            "; llama-cpp-python 0.3.x crashes on quantised GGUFs on some CPUs (AVX512/AMX): use an f16 "
            "target or target.engine: torch"
            if kind not in ("f16", "f32", "bf16")
            else ""
        )
        return (
            f"llama.cpp crashed ({why}) on {kind} GGUF {self.path.name} during {what} on this CPU{last}{hint}"
        )

    def _ask(self, req: dict[str, Any], what: str) -> dict[str, Any]:
        if self._proc.poll() is not None:
            raise EngineUnavailable(self._crash(self._proc.returncode, what))
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(json.dumps(req).encode() + b"\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise EngineUnavailable(self._crash(self._proc.wait(), what)) from None
        reply = self._read(what)
        if "error" in reply:
            raise EngineUnavailable(f"llama.cpp failed on {self.path.name} during {what}: {reply['error']}")
        return reply

    def time(self, prompt: Sequence[int], decode: Sequence[int]) -> tuple[float, float]:
        """Seconds of one prefill of `prompt` (empty cache) and of one-token steps over `decode`."""
        req = {"op": "time", "prompt": list(map(int, prompt)), "decode": list(map(int, decode))}
        r = self._ask(req, f"a {len(prompt)}-token prefill")
        return float(r["prefill_s"]), float(r["decode_s"])

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """llama.cpp's logits [len(ids), vocab] for one sequence, evaluated from an empty cache."""
        head = self._ask({"op": "logits", "ids": list(map(int, ids))}, f"a {len(ids)}-token evaluation")
        n = int(head["rows"]) * int(head["cols"]) * 4
        assert self._proc.stdout is not None
        data = self._proc.stdout.read(n)
        if len(data) != n:
            raise EngineUnavailable(self._crash(self._proc.wait(), "reading logits"))
        return np.frombuffer(data, dtype=np.float32).reshape(int(head["rows"]), int(head["cols"])).copy()

    def close(self) -> None:
        """End the child (asked politely, then killed) and drop its files."""
        if self._proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert self._proc.stdin is not None
                self._proc.stdin.write(b'{"op": "close"}\n')
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for f in (self._proc.stdin, self._proc.stdout, self._err):
            with contextlib.suppress(OSError, ValueError):
                if f is not None:
                    f.close()

    def __enter__(self) -> LlamaProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def open_gguf(
    path: str | Path, n_ctx: int, threads: int | None = None, all_logits: bool = True
) -> Iterator[LlamaProcess]:
    """A llama.cpp model in a child process; `all_logits` keeps every position's logits (else the last)."""
    with LlamaProcess(path, n_ctx, threads, all_logits) as llm:
        yield llm


def logits(llm: LlamaProcess, ids: Sequence[int]) -> np.ndarray:
    """llama.cpp's logits [len(ids), vocab] for one sequence, evaluated from an empty cache."""
    return llm.logits(ids)


def window_nll(llm: LlamaProcess, windows: torch.Tensor) -> float:
    """Mean next-token NLL over windows [n, seqlen], the protocol of runtime.measure.evaluate."""
    total, count = 0.0, 0
    for row in windows.tolist():
        lg = torch.from_numpy(logits(llm, row)).double()
        target = torch.tensor(row[1:])
        total += float(torch.nn.functional.cross_entropy(lg[:-1], target, reduction="sum"))
        count += len(row) - 1
    return total / count


def perplexity(path: str | Path, windows: torch.Tensor, threads: int | None = None) -> float:
    """exp(mean NLL) of a GGUF file in llama.cpp on the same windows Secateur evaluates."""
    with open_gguf(path, int(windows.shape[1]), threads) as llm:
        return float(np.exp(window_nll(llm, windows)))


def speed(llm: LlamaProcess, prompt: Sequence[int], decode: Sequence[int]) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s): one prompt, then one-token steps over `decode` (the
    text's own next tokens: the same work as sampling them). Open the model with all_logits=False
    so llama.cpp computes the LM head for the last position of each step only, as a server does."""
    pre, dec = llm.time(prompt, decode)
    return len(prompt) / pre, len(decode) / dec
