"""Check: `secateur eval`'s zero-shot accuracies are unchanged by the move to lm-eval task YAML files.

Not a test. Loads SmolLM2-135M once (fp32, CPU) and runs the six local tasks with `--limit N`
twice on the same model object: through the inline lm-eval configs `runtime/measure/zeroshot.py` built
before the YAML files (read from git commit 2a04264) and through the shipped YAML files
(`runtime/measure/tasks/`). Prints both result sets and whether every accuracy and standard error is equal.

    python bench/zeroshot_yaml_check.py --limit 10
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from secateur.runtime.measure import zeroshot
from secateur.runtime.store.data import default_data_root
from secateur.runtime.store.loader import load_model

BEFORE = "2a04264"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=10)
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    src = subprocess.run(
        ["git", "show", f"{BEFORE}:runtime/measure/zeroshot.py"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "zeroshot_before.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location("zeroshot_before", path)
        before = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(before)
    lm = load_model("smollm2-135m", dtype="float32", device="cpu")
    out = {}
    for name, mod in (("before", before), ("after", zeroshot)):
        t = time.time()
        out[name] = mod.run_zeroshot(
            lm.model, lm.tokenizer, list(zeroshot.LOCAL_TASKS), default_data_root(), args.limit, 8
        )
        print(name, f"{time.time() - t:.0f}s", json.dumps(out[name]), flush=True)
    same = out["before"] == out["after"]
    print("identical:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
