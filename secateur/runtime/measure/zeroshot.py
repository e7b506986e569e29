"""Zero-shot accuracy through lm-eval, offline, from the local jsonl copies of the standard tasks.

Each local task is an lm-eval task YAML file in `runtime/measure/tasks/` (TASKS_DIR) over
`<data_root>/zeroshot/<task>.jsonl` that reproduces the prompt, choices, target and metrics of
lm-eval's own task of the same name (its piqa, arc, hellaswag, winogrande and super_glue/boolq
configs), so accuracies are comparable with published lm-eval numbers while nothing is fetched
from the hub. `secateur eval` runs them through lm-eval's TaskManager(include_path=TASKS_DIR), and
lm-eval's own CLI runs the same files with `--include_path`. Files are checked row by row before
any model is loaded, so a broken file fails in seconds rather than after a prune.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from secateur.runtime.measure.tasks import TASKS_DIR
from secateur.runtime.measure.tasks.utils import SPLITS, task_file
from secateur.runtime.store.data import DATA_ROOT_ENV, default_data_root, iter_jsonl

LOCAL_TASKS = tuple(SPLITS)


def task_config(task: str, data_root: str | Path | None = None) -> dict[str, Any]:
    """The lm-eval config of local task `task`, as its YAML file in TASKS_DIR gives it (functions
    resolved), reading `data_root` (default: as `tasks.utils.data_root` finds it)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if task not in LOCAL_TASKS:
        raise ValueError(f"zeroshot: {task!r} is not a local task ({', '.join(LOCAL_TASKS)})")
    cfg = load_yaml(TASKS_DIR / f"{task}.yaml", resolve_func=True, recursive=True)
    cfg.pop("tag", None)
    cfg["metadata"] = {**cfg.get("metadata", {}), "data_root": str(data_root) if data_root else None}
    return cfg


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
    """lm-eval's TaskManager over its built-in tasks, to check names (indexing takes seconds: done once)."""
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


def _root(tasks: list[str], data_root: str | Path | None) -> Path | None:
    """The data root the local tasks among `tasks` read (None when there are none)."""
    local = [t for t in tasks if t in LOCAL_TASKS]
    if not local:
        return None
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    if root is None:
        raise ValueError(
            f"zeroshot tasks {', '.join(local)}: no data root found; set {DATA_ROOT_ENV} "
            "(or pass data_root) to the folder holding zeroshot/<task>.jsonl"
        )
    return root


def _local_files(tasks: list[str], data_root: str | Path | None) -> dict[str, Path]:
    root = _root(tasks, data_root)
    return {t: task_file(t, root) for t in tasks if t in LOCAL_TASKS} if root else {}


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


class _NoCustomDatasetHint(logging.Filter):
    """lm-eval warns, for every task with a `custom_dataset` (ours), that kwargs can be passed with
    --metadata: Secateur passes the data root that way itself, so the hint is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


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

    root = _root(names, data_root)
    manager = TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=len(files) < len(names),  # indexing lm-eval's own tasks takes seconds
        metadata={"data_root": str(root)} if root else None,
    )
    was_training = model.training
    hint = _NoCustomDatasetHint()
    logging.getLogger("lm_eval.api.task").addFilter(hint)
    try:
        # HFLM sets a pad token on the tokenizer it gets: give it a copy, not the caller's.
        with _quiet("lm_eval.models.huggingface"):
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=names,
            num_fewshot=0,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=100,  # acc's stderr is analytic (mean_stderr); nothing is resampled
            log_samples=False,
        )
    finally:
        logging.getLogger("lm_eval.api.task").removeFilter(hint)
        model.train(was_training)
    if results is None:
        raise RuntimeError("zeroshot: lm-eval returned no results (non-zero rank?)")
    return _summarise(results)
