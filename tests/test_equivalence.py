"""Refactors preserve behaviour: prunes of every tiny family with representative recipes match the
golden digests recorded from main before the refactor (weights, logits, lock, report, output files).

Regenerate only for an intended behaviour change: `SECATEUR_RECORD_GOLDEN=1 pytest tests/test_equivalence.py`
(and `-m integration` for the SmolLM2 case), then say why in the commit. Digests are bit-exact for
the thread count conftest sets (CPU matmuls reduce in a thread-dependent order).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from secateur.api import prune
from secateur.runtime.store.io import load_pruned
from secateur.testing import TINY_FAMILIES, save_tiny

GOLDEN = Path(__file__).parent / "data" / "equivalence.json"
RECORD = os.environ.get("SECATEUR_RECORD_GOLDEN") == "1"
# report keys that measure this run (time, memory, speed) rather than describe its result
VOLATILE_REPORT = {"phases", "memory", "speed", "engine_speed", "engine_speed_skipped"}
VOLATILE_LOCK = {"versions", "threads", "recipe_dir"}


def _text(path: Path, n_chars: int = 30000) -> None:
    rng = random.Random(0)
    words = ["the", "model", "prunes", "channels", "and", "heads", "of", "a", "layer", "quickly", "while"]
    path.write_text(" ".join(rng.choice(words) for _ in range(n_chars // 5)))


def _attention(family: str) -> str:
    return "kv_group" if family == "opt" else "q_head"


def recipes(family: str) -> dict[str, dict[str, Any]]:
    """Representative recipes: FASP widths (evaluated), a sublayer method in a multipruner, FLAP,
    FASP under a proportional allocation."""
    return {
        "fasp_width": {
            "targets": {"mlp": True, "attention": _attention(family)},
            "evaluate": {
                "perplexity": [{"dataset": "c.txt", "split": "test", "seqlen": 32, "max_windows": 3}],
                "latency": {"prefill_len": 8, "decode_tokens": 2, "repeats": 1},
            },
        },
        "multipruner": {
            "method": "multipruner",
            "allocation": {"method": "uniform"},
            "passes": [
                {
                    "name": "sub",
                    "method": "blockpruner",
                    "targets": {"sublayers": True, "mlp": False},
                    "share": 0.4,
                },
                {
                    "name": "mlp",
                    "method": "fasp",
                    "targets": {"mlp": True, "attention": "none"},
                    "share": 0.6,
                },
            ],
        },
        "flap": {
            "method": "flap",
            "targets": {"mlp": True, "attention": _attention(family)},
            "importance": {"metric": "fluctuation"},
            "restore": {"method": "bias_compensation"},
        },
        "proportional": {
            "targets": {"mlp": True, "attention": "none"},
            "allocation": {"method": "proportional"},
        },
    }


def _write_recipe(tmp: Path, family: str, name: str, body: dict[str, Any]) -> Path:
    if not (tmp / "m").exists():
        save_tiny(str(tmp / "m"), family)
        _text(tmp / "c.txt")
    doc = {
        "version": 1,
        "name": f"eq-{name}",
        "model": {"id": "m", "dtype": "float32", "device": "cpu"},
        "calibration": {"dataset": "c.txt", "split": "validation", "n_samples": 8, "seqlen": 32},
        "budget": {"params": 0.3, "multiple_of": 4},
        "evaluate": {"enabled": False},
        "output": {"dir": str(tmp / f"out-{name}")},
        **body,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


def _timeless(obj: Any) -> Any:
    """`obj` without measured times (a layer's seconds, a sublayer step's cost per candidate)."""
    if isinstance(obj, dict):
        timed = [k for k in obj if k.startswith("seconds") or k.endswith("_s") or k == "step_cost"]
        return {k: _timeless(v) for k, v in obj.items() if k not in timed}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


def _json_sha(obj: Any, roots: dict[str, str]) -> str:
    text = json.dumps(_timeless(obj), sort_keys=True, default=str)
    for path, name in roots.items():
        text = text.replace(path, name)
    return _sha(text.encode())


def digest(out_dir: Path, tmp: Path, vocab: int = 128, data_root: Path | None = None) -> dict[str, Any]:
    """What must not change: every output file's bytes (report/lock without their volatile keys),
    the pruned model's logits, the lock's fingerprints."""
    roots = {str(tmp): "<tmp>", **({str(data_root): "<data>"} if data_root else {})}
    lock = yaml.safe_load((out_dir / "recipe.lock.yaml").read_text())
    report = json.loads((out_dir / "report.json").read_text())
    # the model card prints the measured speed when evaluated; the report's other keys cover it
    skip = {"recipe.lock.yaml", "report.json", "report.md", "widths.png"} | (
        {"README.md"} if "speed" in report else set()
    )
    files = {}
    for f in sorted(out_dir.iterdir()):
        if f.is_file() and f.name not in skip:
            text = f.read_bytes()
            for path, name in roots.items():
                text = text.replace(path.encode(), name.encode())
            files[f.name] = _sha(text)
    model = load_pruned(out_dir)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits.float()
    return {
        "fingerprints": lock["fingerprints"],
        "lock": _json_sha({k: v for k, v in lock.items() if k not in VOLATILE_LOCK}, roots),
        "report": _json_sha({k: v for k, v in report.items() if k not in VOLATILE_REPORT}, roots),
        "perplexity": report.get("perplexity"),
        "order": [list(report), list(lock)],  # the files' key order, which the sorted digests ignore
        "files": files,
        "logits": _sha(logits.numpy().tobytes()),
        "logits_sum": round(float(logits.double().sum()), 4),
    }


def _golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


def check(case: str, got: dict[str, Any]) -> None:
    if RECORD:
        data = _golden()
        data[case] = got
        GOLDEN.write_text(json.dumps(dict(sorted(data.items())), indent=1, sort_keys=True) + "\n")
        return
    want = _golden().get(case)
    assert want is not None, f"{case}: no golden digest in {GOLDEN} (record with SECATEUR_RECORD_GOLDEN=1)"
    diff = [k for k in want if want[k] != got.get(k)]
    assert not diff, (
        f"{case}: {diff} changed\nwant {json.dumps({k: want[k] for k in diff})}\ngot  {json.dumps({k: got.get(k) for k in diff})}"
    )


def _run(recipe: Path, **kw: Any) -> Any:
    return prune(recipe, progress=False, log=lambda s: None, **kw)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_recipes_give_the_recorded_outputs(tmp_path: Path, family: str, one_thread: None) -> None:
    for name, body in recipes(family).items():
        out = _run(_write_recipe(tmp_path, family, name, body))
        check(f"{family}/{name}", digest(out.output, tmp_path))


def test_streamed_and_lock_reapplied_give_the_recorded_outputs(tmp_path: Path, one_thread: None) -> None:
    body = recipes("llama")["fasp_width"]
    streamed = _run(
        _write_recipe(
            tmp_path,
            "llama",
            "streamed",
            {**body, "model": {"id": "m", "dtype": "float32", "device": "cpu", "stream": True}},
        )
    )
    check("llama/fasp_width_streamed", digest(streamed.output, tmp_path))
    first = _run(_write_recipe(tmp_path, "llama", "fasp_width", body))
    again = _run(None, lock_path=first.output / "recipe.lock.yaml", output=tmp_path / "again")
    assert again.reproduced is True
    check("llama/fasp_width_relocked", digest(again.output, tmp_path))


@pytest.mark.integration
def test_smollm2_recipe_gives_the_recorded_output(tmp_path: Path, data_root: Path, one_thread: None) -> None:
    """FASP-30 on SmolLM2-135M, small calibration, no evaluation (about a minute on 2 cores)."""
    doc = {
        "version": 1,
        "name": "eq-smollm2",
        "model": {"id": "smollm2-135m", "dtype": "float32", "device": "cpu"},
        "calibration": {"dataset": "wikitext2", "n_samples": 16, "seqlen": 128, "data_root": str(data_root)},
        "targets": {"mlp": True, "attention": "q_head"},
        "budget": {"params": 0.3, "multiple_of": 32},
        "evaluate": {"enabled": False},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    out = _run(path, output=tmp_path / "out")
    got = digest(out.output, tmp_path, vocab=49152, data_root=data_root)
    check("smollm2/fasp30", got)
