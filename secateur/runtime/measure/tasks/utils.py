"""Data loading and prompt helpers of the local zero-shot tasks (lm-eval imports this file by path).

The prompt helpers reproduce lm-eval's own task utilities (hellaswag, winogrande, super_glue/boolq)
so accuracies are comparable with published lm-eval numbers; the loaders read the local jsonl
copies instead of the hub.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from secateur.runtime.store.data import DATA_ROOT_ENV, default_data_root

# The split lm-eval scores each task on (its test split when it has one, else validation).
SPLITS = {
    "piqa": "validation",
    "arc_easy": "test",
    "arc_challenge": "test",
    "hellaswag": "validation",
    "winogrande": "validation",
    "boolq": "validation",
}


def data_root(value: str | os.PathLike | None = None) -> Path:
    """Where the data is: the given root (lm-eval `--metadata '{"data_root": ...}'`), else
    $SECATEUR_DATA_ROOT, else Secateur's default data folder (as `secateur eval` finds it)."""
    root = Path(value).expanduser() if value else default_data_root()
    if root is None:
        raise ValueError(
            f"Secateur zero-shot tasks: no data root; set {DATA_ROOT_ENV} or pass "
            '--metadata \'{"data_root": "/path/to/data"}\' (the folder holding zeroshot/<task>.jsonl)'
        )
    return root


def task_file(task: str, root: str | os.PathLike) -> Path:
    """Where local task `task` is read from: `<root>/zeroshot/<task>.jsonl`."""
    return Path(root).expanduser() / "zeroshot" / f"{task}.jsonl"


def _load(task: str, kwargs: dict[str, Any]) -> Any:
    import datasets

    path = task_file(task, data_root(kwargs.get("data_root")))
    if not path.is_file():
        raise FileNotFoundError(f"zeroshot task {task}: {path} not found")
    return datasets.load_dataset("json", data_files={SPLITS[task]: str(path.resolve())})


def _loader(task: str) -> Any:
    def load(**kwargs: Any) -> Any:
        return _load(task, kwargs)

    load.__doc__ = f"lm-eval `custom_dataset`: the local {task} rows (kwargs: the task's metadata)."
    return load


# one lm-eval `custom_dataset` per task (the YAML files name them: `!function utils.piqa`)
piqa = _loader("piqa")
arc_easy = _loader("arc_easy")
arc_challenge = _loader("arc_challenge")
hellaswag = _loader("hellaswag")
winogrande = _loader("winogrande")
boolq = _loader("boolq")


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag clean-up: WikiHow '[title]' markers become sentence breaks, brackets go."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(doc: dict[str, Any]) -> dict[str, Any]:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "query": hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
        "choices": [hellaswag_preprocess(e) for e in doc["endings"]],
        "gold": int(doc["label"]),
    }


def hellaswag_process_docs(dataset: Any) -> Any:
    """lm-eval's hellaswag `process_docs`: adds query, choices and gold to every row."""
    return dataset.map(_hellaswag_doc)


def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    """Partial scoring: the context is chosen by the answer (an index into the choices)."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    """The sentence after the blank, scored after each filled-in prefix."""
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    """The sentence up to the blank, filled with each option."""
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]


def boolq_doc_to_target(doc: dict[str, Any]) -> int:
    """The HF boolq `answer` bool as SuperGLUE's 0/1 label (choices are no, yes)."""
    return int(bool(doc["answer"]))
