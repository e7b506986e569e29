"""Zero-shot accuracy through lm-eval, offline, from the local jsonl copies of the standard tasks.

Each local task is an inline lm-eval config over `<data_root>/zeroshot/<task>.jsonl` that
reproduces the prompt, choices, target and metrics of lm-eval's own task of the same name (its
piqa, arc, hellaswag, winogrande and super_glue/boolq configs), so accuracies are comparable with
published lm-eval numbers while nothing is fetched from the hub. Files are checked row by row
before any model is loaded, so a broken file fails in seconds rather than after a prune.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from secateur.runtime.data import DATA_ROOT_ENV, default_data_root, iter_jsonl

LOCAL_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq")

# The split lm-eval scores each task on (its test split when it has one, else validation).
_SPLIT = {
    "piqa": "validation",
    "arc_easy": "test",
    "arc_challenge": "test",
    "hellaswag": "validation",
    "winogrande": "validation",
    "boolq": "validation",
}


# ----------------------------------------------------------------- prompt formats (lm-eval's)


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


def _metrics(norm: bool) -> list[dict[str, Any]]:
    names = ("acc", "acc_norm") if norm else ("acc",)
    return [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in names]


# Everything but the data location, copied from lm-eval's task YAMLs.
_FORMATS: dict[str, dict[str, Any]] = {
    "piqa": {
        "doc_to_text": "Question: {{goal}}\nAnswer:",
        "doc_to_target": "label",
        "doc_to_choice": "{{[sol1, sol2]}}",
        "metric_list": _metrics(True),
        "metadata": {"version": 1.0},
    },
    "arc_easy": {
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "gold",
        "doc_to_choice": "{{choices.text}}",
        "metric_list": _metrics(True),
        "metadata": {"version": 1.0},
    },
    "hellaswag": {
        "process_docs": hellaswag_process_docs,
        "doc_to_text": "{{query}}",
        "doc_to_target": "{{label}}",
        "doc_to_choice": "choices",
        "metric_list": _metrics(True),
        "metadata": {"version": 1.0},
    },
    "winogrande": {
        "doc_to_text": winogrande_doc_to_text,
        "doc_to_target": winogrande_doc_to_target,
        "doc_to_choice": winogrande_doc_to_choice,
        "metric_list": _metrics(False),
        "metadata": {"version": 1.0},
    },
    "boolq": {
        "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
        "doc_to_target": boolq_doc_to_target,
        "doc_to_choice": ["no", "yes"],
        "metric_list": _metrics(False),
        "metadata": {"version": 2.0},
    },
}
_FORMATS["arc_challenge"] = _FORMATS["arc_easy"]


def task_config(task: str, path: str | Path) -> dict[str, Any]:
    """An inline lm-eval config for local task `task` reading `path` (made absolute: lm-eval
    resolves relative data_files against the working directory)."""
    if task not in _FORMATS:
        raise ValueError(f"zeroshot: {task!r} is not a local task ({', '.join(LOCAL_TASKS)})")
    split = _SPLIT[task]
    fmt = copy.deepcopy(_FORMATS[task])
    fmt["metadata"]["data_file"] = str(Path(path).resolve())
    return {
        "task": task,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(Path(path).resolve())}},
        "output_type": "multiple_choice",
        "training_split": None,
        "validation_split": split if split == "validation" else None,
        "test_split": split if split == "test" else None,
        "num_fewshot": 0,
        **fmt,
    }


# ----------------------------------------------------------------- checking the files


def _strings(row: dict[str, Any], *keys: str) -> str | None:
    for k in keys:
        if not isinstance(row.get(k), str):
            return f"field {k!r} must be a string"
    return None


def _index(row: dict[str, Any], key: str, n: int) -> str | None:
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n:
        return f"field {key!r} must be an int in [0, {n - 1}], got {v!r}"
    return None


def _str_list(row: dict[str, Any], key: str, v: Any) -> str | None:
    if not isinstance(v, list) or len(v) < 2 or not all(isinstance(x, str) for x in v):
        return f"field {key!r} must be a list of at least 2 strings"
    return None


def _check_piqa(row: dict[str, Any]) -> str | None:
    return _strings(row, "goal", "sol1", "sol2") or _index(row, "label", 2)


def _check_arc(row: dict[str, Any]) -> str | None:
    if err := _strings(row, "question"):
        return err
    choices = row.get("choices")
    texts = choices.get("text") if isinstance(choices, dict) else None
    return _str_list(row, "choices.text", texts) or _index(row, "gold", len(texts))


def _check_hellaswag(row: dict[str, Any]) -> str | None:
    if err := _strings(row, "activity_label", "ctx_a", "ctx_b") or _str_list(
        row, "endings", row.get("endings")
    ):
        return err
    return _index(row, "label", len(row["endings"]))


def _check_winogrande(row: dict[str, Any]) -> str | None:
    if err := _strings(row, "sentence", "option1", "option2"):
        return err
    if "_" not in row["sentence"]:
        return "field 'sentence' has no '_' blank"
    if row.get("answer") not in ("1", "2"):
        return f'field \'answer\' must be "1" or "2", got {row.get("answer")!r}'
    return None


def _check_boolq(row: dict[str, Any]) -> str | None:
    if err := _strings(row, "question", "passage"):
        return err
    return None if isinstance(row.get("answer"), bool) else "field 'answer' must be true or false"


_CHECKS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "piqa": _check_piqa,
    "arc_easy": _check_arc,
    "arc_challenge": _check_arc,
    "hellaswag": _check_hellaswag,
    "winogrande": _check_winogrande,
    "boolq": _check_boolq,
}


def task_file(task: str, data_root: str | Path) -> Path:
    """Where local task `task` is read from: `<data_root>/zeroshot/<task>.jsonl`."""
    return Path(data_root).expanduser() / "zeroshot" / f"{task}.jsonl"


def _check_file(task: str, path: Path) -> None:
    if not path.is_file():
        raise ValueError(f"zeroshot task {task}: {path} not found")
    check = _CHECKS[task]
    rows = 0
    for n, row in iter_jsonl(path, prefix=f"zeroshot task {task}: "):
        err = check(row) if isinstance(row, dict) else "row is not a JSON object"
        if err:
            raise ValueError(f"zeroshot task {task}: {path}:{n}: {err}")
        rows += 1
    if rows == 0:
        raise ValueError(f"zeroshot task {task}: {path} has no rows")


@functools.lru_cache(maxsize=1)
def _registry() -> Any:
    """lm-eval's TaskManager over its built-in tasks (indexing them takes seconds: done once)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def _unique(tasks: Sequence[str]) -> list[str]:
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise ValueError("zeroshot: no tasks given")
    for t in tasks:
        if not isinstance(t, str) or not t:
            raise ValueError(f"zeroshot: task names must be non-empty strings, got {t!r}")
    return list(dict.fromkeys(tasks))


def _local_files(tasks: list[str], data_root: str | Path | None) -> dict[str, Path]:
    local = [t for t in tasks if t in LOCAL_TASKS]
    if not local:
        return {}
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    if root is None:
        raise ValueError(
            f"zeroshot tasks {', '.join(local)}: no data root found; set {DATA_ROOT_ENV} "
            "(or pass data_root) to the folder holding zeroshot/<task>.jsonl"
        )
    return {t: task_file(t, root) for t in local}


def check_tasks(tasks: Sequence[str], data_root: str | Path | None = None) -> None:
    """Fail before any model loads: lm-eval missing, unknown task names, missing files,
    malformed rows (file:line). Names outside LOCAL_TASKS are looked up in lm-eval's registry
    (running them may need the network)."""
    names = _unique(tasks)
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError(f"zeroshot tasks {', '.join(names)} need lm-eval: pip install 'secateur[eval]'")
    others = [t for t in names if t not in LOCAL_TASKS]
    if others:
        known = set(_registry().all_tasks)
        for t in others:
            if t not in known:
                raise ValueError(
                    f"zeroshot: unknown task {t!r}; local tasks are {', '.join(LOCAL_TASKS)} "
                    "(any other name must be a task, group or tag of lm-eval)"
                )
    for task, path in _local_files(names, data_root).items():
        _check_file(task, path)


# ----------------------------------------------------------------- running


def _metric(values: dict[str, Any], name: str) -> float | None:
    for key in (f"{name},none", name):
        v = values.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _summarise(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {acc, acc_norm}} from lm-eval's results, plus the mean over leaf tasks."""
    out: dict[str, dict[str, float]] = {}
    groups = set(results.get("groups", {}))
    for name, values in results["results"].items():
        row = {
            m: v
            for m in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr")
            if (v := _metric(values, m)) is not None and not isinstance(v, str)
        }
        if row:
            out[name] = row
    leaves = [r for name, r in out.items() if name not in groups]
    mean: dict[str, float] = {}
    for m in ("acc", "acc_norm"):
        vals = [r[m] for r in leaves if m in r and not math.isnan(r[m])]
        if vals:
            mean[m] = sum(vals) / len(vals)
        errs = [r[f"{m}_stderr"] for r in leaves if f"{m}_stderr" in r]
        if vals and len(errs) == len(vals):  # independent tasks: the mean's stderr
            mean[f"{m}_stderr"] = math.sqrt(sum(e * e for e in errs)) / len(errs)
    out["mean"] = mean
    return out


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Hide a logger's warnings for a moment (HFLM warns about every in-memory model it wraps)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def run_zeroshot(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    data_root: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Zero-shot acc (and acc_norm where lm-eval reports it) of an in-memory model on `tasks`.

    Returns {task: {"acc": .., "acc_norm": ..}, "mean": {...}}; "mean" averages every task
    (groups are not counted twice; registry tasks reporting neither metric are left out).
    `limit` caps the documents per task (the first N, for quick checks).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"zeroshot: limit must be a positive int or None, got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"zeroshot: batch_size must be a positive int, got {batch_size!r}")
    names = _unique(tasks)
    check_tasks(names, data_root)
    files = _local_files(names, data_root)
    if tokenizer is None:
        raise ValueError("zeroshot: a tokenizer is required (lm-eval would fetch one from the hub)")

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    specs: list[str | dict[str, Any]] = [task_config(t, files[t]) if t in files else t for t in names]
    manager = _registry() if len(files) < len(names) else TaskManager(include_defaults=False)
    was_training = model.training
    try:
        # HFLM sets a pad token on the tokenizer it gets: give it a copy, not the caller's.
        with _quiet("lm_eval.models.huggingface"):
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            num_fewshot=0,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=100,  # acc's stderr is analytic (mean_stderr); nothing is resampled
            log_samples=False,
        )
    finally:
        model.train(was_training)
    if results is None:
        raise RuntimeError("zeroshot: lm-eval returned no results (non-zero rank?)")
    return _summarise(results)
