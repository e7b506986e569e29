"""Zero-shot tasks run offline from local jsonl, with lm-eval's own prompts, and fail early on bad input."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("lm_eval")

from secateur.runtime.measure import zeroshot  # noqa: E402
from secateur.runtime.measure.zeroshot import LOCAL_TASKS, check_tasks, run_zeroshot, task_config  # noqa: E402
from secateur.testing import tiny_model  # noqa: E402

ROWS = {
    "piqa": [
        {
            "goal": "How do I dry wet shoes?",
            "sol1": "Stuff them with paper.",
            "sol2": "Fill them with water.",
            "label": 0,
        },
        {"goal": "To cut bread,", "sol1": "use a spoon.", "sol2": "use a serrated knife.", "label": 1},
        {"goal": "Keep a drink cold", "sol1": "add ice cubes", "sol2": "add hot tea", "label": 0},
        {"goal": "Open a jar", "sol1": "freeze the lid", "sol2": "run the lid under hot water", "label": 1},
    ],
    "arc_easy": [
        {
            "id": "a1",
            "question": "What do plants need to make food?",
            "choices": {"text": ["sunlight", "sand", "plastic", "noise"]},
            "gold": 0,
        },
        {
            "id": "a2",
            "question": "Which is a liquid at room temperature?",
            "choices": {"text": ["iron", "water", "wood"]},
            "gold": 1,
        },
        {
            "id": "a3",
            "question": "What pulls objects toward Earth?",
            "choices": {"text": ["magnetism", "friction", "gravity", "light"]},
            "gold": 2,
        },
        {
            "id": "a4",
            "question": "Which organ pumps blood?",
            "choices": {"text": ["lung", "heart", "skin", "bone", "eye"]},
            "gold": 1,
        },
    ],
    "winogrande": [
        {
            "sentence": "The cup did not fit in the box because the _ was too big.",
            "option1": "cup",
            "option2": "box",
            "answer": "1",
        },
        {
            "sentence": "The cup did not fit in the box because the _ was too small.",
            "option1": "cup",
            "option2": "box",
            "answer": "2",
        },
        {
            "sentence": "Ann lent Mia a pen because _ had two.",
            "option1": "Ann",
            "option2": "Mia",
            "answer": "1",
        },
        {
            "sentence": "Ann lent Mia a pen because _ had none.",
            "option1": "Ann",
            "option2": "Mia",
            "answer": "2",
        },
    ],
    "hellaswag": [
        {
            "ind": 1,
            "activity_label": "Baking cookies",
            "ctx_a": "A woman mixes dough in a bowl.",
            "ctx_b": "she",
            "ctx": "A woman mixes dough in a bowl. she",
            "split": "val",
            "split_type": "indomain",
            "label": 2,
            "endings": [
                "swims in a lake.",
                "drives a [title] truck.",
                "puts the tray in the oven.",
                "sings loudly.",
            ],
            "source_id": "x",
        },
        {
            "ind": 2,
            "activity_label": "Running",
            "ctx_a": "A man ties his shoes.",
            "ctx_b": "he",
            "ctx": "A man ties his shoes. he",
            "split": "val",
            "split_type": "indomain",
            "label": 0,
            "endings": ["starts jogging down the road.", "eats soup.", "paints a wall.", "reads a map."],
            "source_id": "y",
        },
    ],
    "boolq": [
        {"question": "is water wet", "answer": True, "passage": "Water makes things wet."},
        {"question": "is the sun cold", "answer": False, "passage": "The sun is a hot star."},
    ],
}
ROWS["arc_challenge"] = ROWS["arc_easy"]


def _write(root: Path, task: str, rows: list) -> Path:
    path = root / "zeroshot" / f"{task}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def root(tmp_path: Path, monkeypatch) -> Path:
    import datasets

    # keep the Arrow copies datasets makes of our jsonl files out of the user's cache
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    for task, rows in ROWS.items():
        _write(tmp_path / "data", task, rows)
    return tmp_path / "data"


@pytest.fixture(scope="module")
def char_tokenizer():
    """A real HF fast tokenizer built offline: one token per printable ASCII character (98 ids)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = ["<unk>", "<eos>", "\n"] + [chr(i) for i in range(32, 127)]
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<eos>"
    )


class _NoModel:
    """Stands in for a model: any use of it fails the test, proving checks ran first."""

    def __getattr__(self, name: str):
        raise AssertionError(f"model touched ({name}) before the inputs were checked")


def test_tiny_model_runs_generated_tasks(root: Path, char_tokenizer) -> None:
    model = tiny_model("llama")
    model.train()
    res = run_zeroshot(
        model, char_tokenizer, ["piqa", "arc_easy", "winogrande"], data_root=root, batch_size=4
    )
    assert set(res) == {"piqa", "arc_easy", "winogrande", "mean"}
    assert set(res["piqa"]) == {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}
    assert set(res["winogrande"]) == {"acc", "acc_stderr"}
    for metrics in res.values():
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    # lm-eval's standard error of a mean accuracy over the 4 documents: sqrt(p (1 - p) / (n - 1))
    p = res["winogrande"]["acc"]
    assert res["winogrande"]["acc_stderr"] == pytest.approx((p * (1 - p) / 3) ** 0.5)
    expected = (res["piqa"]["acc"] + res["arc_easy"]["acc"] + res["winogrande"]["acc"]) / 3
    assert res["mean"]["acc"] == pytest.approx(expected)
    assert res["mean"]["acc_norm"] == pytest.approx(
        (res["piqa"]["acc_norm"] + res["arc_easy"]["acc_norm"]) / 2
    )
    assert model.training, "the caller's train/eval mode is restored"
    assert char_tokenizer.pad_token is None, "the caller's tokenizer is not modified"


def test_limit_caps_documents(root: Path, char_tokenizer) -> None:
    res = run_zeroshot(tiny_model("llama"), char_tokenizer, ["piqa"], data_root=root, limit=1)
    assert res["piqa"]["acc"] in (0.0, 1.0)


@pytest.mark.parametrize("limit", [0, -3, 2.5, True, "5"])
def test_limit_must_be_positive_int(root: Path, limit) -> None:
    with pytest.raises(ValueError, match="limit"):
        run_zeroshot(_NoModel(), None, ["piqa"], data_root=root, limit=limit)


def test_tokenizer_is_required(root: Path) -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        run_zeroshot(tiny_model("llama"), None, ["piqa"], data_root=root)


def test_local_tasks_check_clean(root: Path) -> None:
    check_tasks(list(LOCAL_TASKS), root)
    check_tasks(list(LOCAL_TASKS), str(root))


def test_unknown_task_fails_before_model(root: Path, monkeypatch) -> None:
    monkeypatch.setattr(zeroshot, "_registry", lambda: SimpleNamespace(all_tasks=["lambada_openai"]))
    check_tasks(["piqa", "lambada_openai"], root)
    with pytest.raises(ValueError, match=r"unknown task 'piqa_typo'.*piqa, arc_easy"):
        run_zeroshot(_NoModel(), None, ["piqa", "piqa_typo"], data_root=root)


def test_registry_names_are_checked_for_real() -> None:
    check_tasks(["lambada_openai"], None)
    with pytest.raises(ValueError, match="no_such_task_xyz"):
        check_tasks(["no_such_task_xyz"], None)


def test_missing_file_fails_before_model(root: Path) -> None:
    (root / "zeroshot" / "boolq.jsonl").unlink()
    with pytest.raises(ValueError, match=r"boolq.*boolq\.jsonl not found"):
        run_zeroshot(_NoModel(), None, ["piqa", "boolq"], data_root=root)


@pytest.mark.parametrize(
    ("task", "line", "match"),
    [
        ("piqa", "{not json", "not valid JSON"),
        ("piqa", '{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}', "'label'"),
        ("arc_easy", '{"question": "q", "choices": {"text": ["a", "b"]}, "gold": 5}', "'gold'"),
        ("winogrande", '{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}', "blank"),
        ("winogrande", '{"sentence": "a _ b", "option1": "a", "option2": "b", "answer": 1}', "'answer'"),
        ("boolq", '{"question": "q", "passage": "p", "answer": "yes"}', "'answer'"),
        (
            "hellaswag",
            '{"activity_label": "a", "ctx_a": "b", "ctx_b": "c", "endings": "x", "label": 0}',
            "'endings'",
        ),
        ("piqa", "[1, 2]", "not a JSON object"),
    ],
)
def test_malformed_line_is_named(root: Path, task: str, line: str, match: str) -> None:
    path = root / "zeroshot" / f"{task}.jsonl"
    path.write_text(path.read_text() + "\n" + line + "\n")
    n = len(ROWS[task]) + 2  # the rows, one blank line, then the bad one
    with pytest.raises(ValueError, match=rf"{task}\.jsonl:{n}: .*{match}"):
        run_zeroshot(_NoModel(), None, [task], data_root=root)


def test_missing_lm_eval_fails_early(root: Path, monkeypatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a)
    )
    with pytest.raises(ValueError, match=r"need lm-eval.*secateur\[eval\]"):
        check_tasks(["piqa"], root)


def test_empty_file_and_empty_task_list(root: Path) -> None:
    _write(root, "piqa", [])
    with pytest.raises(ValueError, match="no rows"):
        check_tasks(["piqa"], root)
    with pytest.raises(ValueError, match="no tasks"):
        check_tasks([], root)


def _lm_eval_task(task: str, path: Path):
    """lm-eval's own task YAML for `task`, pointed at a local file (upgraded to its dataset's fields)."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask

    loader = pytest.importorskip("lm_eval.tasks._yaml_loader")
    yamls = {
        "piqa": "piqa/piqa.yaml",
        "arc_easy": "arc/arc_easy.yaml",
        "arc_challenge": "arc/arc_challenge.yaml",
        "hellaswag": "hellaswag/hellaswag.yaml",
        "winogrande": "winogrande/default.yaml",
        "boolq": "super_glue/boolq/default.yaml",
    }
    cfg = loader.load_yaml(
        Path(lm_eval.__file__).parent / "tasks" / yamls[task], resolve_func=True, recursive=True
    )
    split = cfg.get("test_split") or cfg["validation_split"]
    for key in ("tag", "include"):
        cfg.pop(key, None)
    cfg.update(
        dataset_path="json",
        dataset_name=None,
        dataset_kwargs={"data_files": {split: str(path)}},
        training_split=None,
        validation_split=split if split == "validation" else None,
    )
    return ConfigurableTask(config=cfg)


def _upstream_row(task: str, row: dict) -> dict:
    """The same row in the layout lm-eval's task expects (ARC labels/answerKey, SuperGLUE label)."""
    row = dict(row)
    if task.startswith("arc"):
        labels = [chr(65 + i) for i in range(len(row["choices"]["text"]))]
        row["choices"] = {"text": row["choices"]["text"], "label": labels}
        row["answerKey"] = labels[row["gold"]]
    if task == "boolq":
        row["label"] = int(row["answer"])
    return row


@pytest.mark.parametrize("task", LOCAL_TASKS)
def test_prompts_match_lm_eval_tasks(root: Path, tmp_path: Path, task: str) -> None:
    from lm_eval.api.task import ConfigurableTask

    ours = ConfigurableTask(config=task_config(task, root))
    upstream_file = _write(tmp_path / "upstream", task, [_upstream_row(task, r) for r in ROWS[task]])
    ref = _lm_eval_task(task, upstream_file)
    for t in (ours, ref):
        t.build_all_requests(rank=0, world_size=1)
    assert [i.arguments for i in ours.instances] == [i.arguments for i in ref.instances]
    assert [ours.doc_to_target(d) for d in ours.eval_docs] == [ref.doc_to_target(d) for d in ref.eval_docs]
    assert [m["metric"] for m in ours.config.metric_list] == [m["metric"] for m in ref.config.metric_list]


@pytest.mark.integration
def test_smollm2_piqa_arc_easy(smollm2, data_root: Path) -> None:
    res = run_zeroshot(smollm2.model, smollm2.tokenizer, ["piqa", "arc_easy"], data_root=data_root, limit=20)
    for task in ("piqa", "arc_easy"):
        assert set(res[task]) == {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr"}
        assert all(0.0 <= v <= 1.0 for v in res[task].values())
        assert 0.0 < res[task]["acc_stderr"] < 0.2  # 20 documents: sqrt(p (1 - p) / 19)
    assert res["piqa"]["acc"] > 0.5, res


def test_lm_eval_cli_runs_the_shipped_tasks_on_a_saved_model(root: Path, tmp_path: Path) -> None:
    """lm-eval's own CLI, given the task folder Secateur ships, evaluates a uniform output offline."""
    import os
    import subprocess
    import sys

    from secateur.graph.adapters import adapter_for
    from secateur.graph.keep import LayerKeep
    from secateur.runtime.measure.tasks import TASKS_DIR
    from secateur.runtime.prune.surgery import apply_keep
    from secateur.runtime.store.io import save_pruned
    from secateur.testing import tiny_tokenizer

    model = tiny_model("llama")
    apply_keep(model, adapter_for(model.config), {i: LayerKeep(mlp=list(range(48))) for i in range(3)})
    out = save_pruned(model, tmp_path / "pruned", tiny_tokenizer())
    env = dict(os.environ, HF_DATASETS_CACHE=str(tmp_path / "hf_cache"), HF_HUB_OFFLINE="1")
    env.pop("SECATEUR_DATA_ROOT", None)
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={out}",
        "--include_path", str(TASKS_DIR), "--tasks", "piqa,winogrande", "--limit", "2", "--device", "cpu",
        "--metadata", json.dumps({"data_root": str(root)}), "--output_path", str(tmp_path / "res"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res_file,) = (tmp_path / "res").rglob("results_*.json")
    results = json.loads(res_file.read_text())["results"]
    assert set(results) == {"piqa", "winogrande"}
    assert results["piqa"]["acc,none"] in (0.0, 0.5, 1.0) and "acc_stderr,none" in results["winogrande"]
