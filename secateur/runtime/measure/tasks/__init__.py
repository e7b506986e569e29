"""The six local zero-shot tasks as lm-eval task YAML files (plus `utils.py`, which lm-eval imports).

`secateur eval` runs them through lm-eval's `TaskManager(include_path=TASKS_DIR)`, and lm-eval's own
CLI runs the same files: `lm_eval --model hf --model_args pretrained=DIR --include_path TASKS_DIR
--tasks piqa,arc_easy` (or `--tasks secateur_zeroshot` for all six). The data is read from
`<data_root>/zeroshot/<task>.jsonl`, `data_root` being lm-eval's `--metadata '{"data_root": ...}'`,
else $SECATEUR_DATA_ROOT, else Secateur's default data folder.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
TAG = "secateur_zeroshot"
