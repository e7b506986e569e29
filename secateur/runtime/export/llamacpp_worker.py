"""A child process that holds one GGUF open in llama.cpp and answers timing and logits requests.

llama-cpp-python 0.3.36 segfaults on some CPUs (AVX512/AMX) when it prefills 16 or more tokens of a
quantised GGUF; run in the user's process that kills the whole prune or sweep. `llamacpp.LlamaProcess`
starts this file as a script (`python llamacpp_worker.py CONFIG`), so it imports llama_cpp and the
standard library only (no torch, no Secateur: it starts in well under a second), loads the model
once and serves many requests. A crash is seen by the parent as a dead child with a signal.

Protocol: the config is a JSON object on the command line (path, n_ctx, n_batch, n_ubatch, threads,
logits_all). Requests are JSON lines on stdin; every reply is one JSON line on the original stdout
(fd 1 is pointed at stderr so nothing llama.cpp prints can corrupt it), followed for `logits` by
rows x cols float32 values in native byte order.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, BinaryIO


def _reply(out: BinaryIO, obj: dict[str, Any], payload: bytes = b"") -> None:
    out.write(json.dumps(obj).encode() + b"\n" + payload)
    out.flush()


def _load(cfg: dict[str, Any]) -> Any:
    from llama_cpp import Llama

    return Llama(
        model_path=cfg["path"],
        n_ctx=int(cfg["n_ctx"]),
        n_batch=int(cfg["n_batch"]),
        n_ubatch=int(cfg["n_ubatch"]),
        logits_all=bool(cfg["logits_all"]),
        n_threads=int(cfg["threads"]),
        n_threads_batch=int(cfg["threads"]),
        verbose=False,
    )


def _time(llm: Any, req: dict[str, Any]) -> dict[str, float]:
    """One prefill of the prompt from an empty cache, then one-token decode steps."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval([int(t) for t in req["prompt"]])
    t1 = time.perf_counter()
    for tok in req["decode"]:
        llm.eval([int(tok)])
    t2 = time.perf_counter()
    return {"prefill_s": t1 - t0, "decode_s": t2 - t1}


def _logits(llm: Any, req: dict[str, Any]) -> tuple[dict[str, int], bytes]:
    import numpy as np

    ids = [int(t) for t in req["ids"]]
    llm.reset()
    llm.eval(ids)
    scores = np.ascontiguousarray(llm.scores[: len(ids)], dtype=np.float32)
    return {"rows": int(scores.shape[0]), "cols": int(scores.shape[1])}, scores.tobytes()


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # no sibling shadows a package
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    cfg = json.loads(sys.argv[1])
    try:
        llm = _load(cfg)
    except Exception as e:  # a file llama.cpp cannot read: the parent reports it by name
        _reply(out, {"error": f"{type(e).__name__}: {e}"})
        return 1
    _reply(out, {"ok": True})
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("op") == "close":
            break
        try:
            if req["op"] == "time":
                _reply(out, _time(llm, req))
            elif req["op"] == "logits":
                head, payload = _logits(llm, req)
                _reply(out, head, payload)
            else:
                _reply(out, {"error": f"unknown request {req.get('op')!r}"})
        except Exception as e:
            _reply(out, {"error": f"{type(e).__name__}: {e}"})
    llm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
