"""Fault injection and bad input on tiny models: nothing a user owns is deleted, no silently wrong
model or number, errors before heavy work, no debris after a kill or a full disk."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from secateur.api import prune
from secateur.graph.adapters import adapter_for
from secateur.graph.keep import LayerKeep
from secateur.lock import LOCK_NAME, LockError
from secateur.recipe.compile import BudgetError
from secateur.recipe.errors import RecipeError
from secateur.recipe.load import load_recipe
from secateur.runtime.prune.surgery import apply_keep, drop_attention, drop_mlp
from secateur.runtime.store.formats import PrunedFolderError
from secateur.runtime.store.io import load_pruned, save_pruned
from secateur.runtime.store.loader import ModelLoadError, load_model
from secateur.runtime.store.outdir import MANIFEST, OutputExistsError, OutputLocationError
from secateur.testing import save_tiny, tiny_model, tiny_tokenizer

from .conftest import model_recipe

ROOT = Path(__file__).resolve().parents[1]


def _text(n_words: int = 8000, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["the", "model", "prunes", "channels", "and", "heads", "of", "a", "layer", "quickly", "while"]
    return " ".join(rng.choice(words) for _ in range(n_words))


def _recipe(tmp: Path, name: str = "recipe.yaml", evaluate: bool = False, **over) -> Path:
    checks = {
        "enabled": evaluate,
        "perplexity": [{"dataset": "calib.txt", "split": "test", "seqlen": 32, "max_windows": 2}],
        "latency": {"prefill_len": 8, "decode_tokens": 2, "repeats": 1},
    }
    return model_recipe(tmp, name, _text(), **{"evaluate": checks, **over})


# ---- 1. --overwrite never deletes what Secateur did not write ------------------------------------


def test_overwrite_refuses_a_users_folder(tmp_path: Path) -> None:
    r = _recipe(tmp_path)
    mine = tmp_path / "v"
    mine.mkdir()
    (mine / "f").write_text("keep")
    with pytest.raises(OutputExistsError, match=r"not a Secateur output.*\bf\b"):
        prune(r, output=mine, overwrite=True, progress=False, log=lambda s: None)
    assert (mine / "f").read_text() == "keep"


def test_overwrite_refuses_an_output_holding_a_users_file(tmp_path: Path) -> None:
    r = _recipe(tmp_path)
    out = tmp_path / "out"
    prune(r, output=out, progress=False, log=lambda s: None)
    assert (out / MANIFEST).is_file()
    prune(r, output=out, overwrite=True, progress=False, log=lambda s: None)  # its own output: replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="notes.txt"):
        prune(r, output=out, overwrite=True, progress=False, log=lambda s: None)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["cwd", "recipe", "data", "model"])
def test_output_may_not_hold_what_the_run_reads(tmp_path: Path, monkeypatch, where: str) -> None:
    r = _recipe(tmp_path)
    monkeypatch.chdir(tmp_path / "model" if where == "cwd" else ROOT)
    out = {"cwd": Path("."), "recipe": tmp_path, "data": tmp_path, "model": tmp_path / "model"}[where]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(OutputLocationError, match="is or contains"):
        prune(r, output=out, overwrite=True, progress=False, log=lambda s: None)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


# ---- 2. an output plain transformers cannot load exactly does not load there ---------------------


def _saved_with_removed_branch(tmp: Path) -> Path:
    model = tiny_model("llama").eval()
    adapter = adapter_for(model.config)
    drop_attention(model, adapter, 1)
    return save_pruned(model, adapter, tmp / "out", tiny_tokenizer())


def test_removed_branch_fails_loudly_in_plain_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = _saved_with_removed_branch(tmp_path)
    with pytest.raises(ValueError, match=r"secateur\.load_pruned"):
        AutoModelForCausalLM.from_pretrained(str(out))
    assert AutoTokenizer.from_pretrained(str(out)) is not None  # the tokenizer still loads
    lm = load_model(str(out))  # and Secateur loads the real model
    assert lm.model.model.layers[1].self_attn.__class__.__name__ == "SkippedAttention"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("branch", ["attention", "mlp"])
def test_removed_branch_fails_through_concrete_classes_too(tmp_path: Path, family: str, branch: str) -> None:
    import transformers

    model = tiny_model(family).eval()
    adapter = adapter_for(model.config)
    (drop_attention if branch == "attention" else drop_mlp)(model, adapter, 1)
    out = save_pruned(model, adapter, tmp_path / "out", tiny_tokenizer())
    cls = type(model)  # LlamaForCausalLM / Qwen2ForCausalLM: they never read model_type
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        cls.from_pretrained(str(out))
    arch = json.loads((out / "config.json").read_text())["architectures"]
    assert arch == [f"SecateurPruned{cls.__name__}"] and not hasattr(transformers, arch[0])
    back = load_pruned(out)
    _same_weights(back, model)  # Secateur's loader: bit for bit
    back.save_pretrained(str(tmp_path / "again"))  # a loaded model saved the usual way stays refused
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        cls.from_pretrained(str(tmp_path / "again"))
    _same_weights(load_pruned(tmp_path / "again"), model)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_uniform_output_still_loads_exactly_through_concrete_classes(tmp_path: Path, family: str) -> None:
    model = tiny_model(family).eval()
    adapter = adapter_for(model.config)
    apply_keep(model, adapter, {i: LayerKeep(mlp=list(range(0, 96, 2))) for i in range(3)})
    out = save_pruned(model, adapter, tmp_path / "out", tiny_tokenizer())
    _same_weights(type(model).from_pretrained(str(out)), model)


def test_flap_bias_output_fails_loudly_in_plain_transformers(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    r = _recipe(
        tmp_path,
        method="flap",
        importance={"metric": "fluctuation"},
        restore={"method": "bias_compensation"},
        targets={"mlp": True, "attention": "none"},
    )
    out = prune(r, output=tmp_path / "out", progress=False, log=lambda s: None).output
    with pytest.raises(ValueError, match=r"secateur\.load_pruned"):
        AutoModelForCausalLM.from_pretrained(str(out))


# ---- 3. locks: refused when tampered, nothing written when verification fails --------------------


@pytest.fixture(scope="module")
def locked_run(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("locked")
    r = _recipe(tmp)
    out = prune(r, output=tmp / "out", progress=False, log=lambda s: None).output
    return tmp, out / LOCK_NAME


def _tampered(tmp: Path, lock: Path, edit) -> Path:
    data = yaml.safe_load(lock.read_text())
    edit(data)
    path = tmp / f"tampered-{random.random()}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _first_layer(data: dict) -> dict:
    return next(iter(data["kept"][0].values()))


@pytest.mark.parametrize(
    "edit,match",
    [
        (
            lambda d: _first_layer(d).update(mlp=[-1] + _first_layer(d)["mlp"][1:]),
            r"kept\.0\.\d+\.mlp: negative",
        ),
        (lambda d: _first_layer(d).update(mlp=[0, 0]), r"kept\.0\.\d+\.mlp: duplicated"),
        (
            lambda d: _first_layer(d).update(mlp=[0, 100000]),
            r"kept\.0\.\d+\.mlp: index 100000 is out of range",
        ),
        (lambda d: d["kept"][0].update({"99": {"mlp": [0]}}), r"kept\.0\.99: the model has 3 layers"),
        (lambda d: d["kept"][0].update({"x": {"mlp": [0]}}), r"kept\.0: 'x' is not a layer index"),
        (lambda d: _first_layer(d).update(mlp="all"), r"mlp: expected a list of integers"),
        (lambda d: _first_layer(d).update(heads=[0]), r"heads: unknown key"),
        (lambda d: d.update(kept="none"), r"kept: expected a list"),
        (lambda d: d["fingerprints"].update(model=3), r"fingerprints\.model: expected a sha256"),
    ],
    ids=["negative", "duplicate", "range", "layer", "layer-name", "type", "key", "kept-type", "fingerprint"],
)
def test_tampered_lock_refused_before_work(locked_run, edit, match) -> None:
    tmp, lock = locked_run
    bad = _tampered(tmp, lock, edit)
    out = tmp / f"again-{bad.stem}"
    with pytest.raises(LockError, match=match):
        prune(lock_path=bad, output=out, progress=False, log=lambda s: None)
    assert not out.exists()


def test_python_tag_in_lock_refused(locked_run) -> None:
    tmp, lock = locked_run
    bad = tmp / "tag.yaml"
    bad.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(LockError, match="python tags are refused"):
        prune(lock_path=bad, output=tmp / "tag-out", progress=False, log=lambda s: None)


def test_failed_lock_verification_writes_nothing(locked_run) -> None:
    tmp, lock = locked_run
    bad = _tampered(tmp, lock, lambda d: d["fingerprints"].update(pruned_model="0" * 64))
    out = tmp / "differ"
    with pytest.raises(LockError, match="differ.*nothing was written"):
        prune(lock_path=bad, output=out, progress=False, log=lambda s: None)
    assert not out.exists()
    assert not [p for p in tmp.iterdir() if p.name.startswith(".differ")]


# ---- 4 and 6. a prune that would change nothing, and errors found before the model loads --------


def _never_load(monkeypatch) -> None:
    import secateur.pipeline as api

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(api, "load_model", boom)


@pytest.mark.parametrize(
    "targets,match",
    [
        ({"mlp": True, "layers": ["re:nothing\\.matches"]}, "no layer of the model's 3 is eligible"),
        ({"mlp": True, "protect": {"first": 2, "last": 1}}, "no layer of the model's 3 is eligible"),
        ({"mlp": True, "layers": ["7"]}, "out of range for a model with 3 layers"),
    ],
    ids=["regex", "protect-all", "index"],
)
def test_noop_or_impossible_targets_fail_before_loading(tmp_path: Path, monkeypatch, targets, match) -> None:
    r = _recipe(tmp_path, targets=targets)
    _never_load(monkeypatch)
    with pytest.raises(BudgetError, match=match):
        prune(r, output=tmp_path / "out", progress=False, log=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_unmeetable_budget_fails_before_loading(tmp_path: Path, monkeypatch) -> None:
    r = _recipe(tmp_path, targets={"mlp": True, "layers": ["0"]}, budget={"params": 0.6})
    _never_load(monkeypatch)
    with pytest.raises(BudgetError, match="budget"):
        prune(r, output=tmp_path / "out", progress=False, log=lambda s: None)


def test_output_under_a_file_fails_before_loading(tmp_path: Path, monkeypatch) -> None:
    r = _recipe(tmp_path)
    (tmp_path / "afile").write_text("x")
    _never_load(monkeypatch)
    with pytest.raises(OutputLocationError, match="is a file"):
        prune(r, output=tmp_path / "afile" / "out", progress=False, log=lambda s: None)
    with pytest.raises(OutputLocationError, match="not a folder"):
        prune(r, output=tmp_path / "afile", overwrite=True, progress=False, log=lambda s: None)


def test_explain_refuses_a_noop_recipe(tmp_path: Path) -> None:
    from secateur.explain import explain

    r = load_recipe(_recipe(tmp_path, targets={"mlp": True, "protect": {"first": 3}}))
    with pytest.raises(BudgetError, match="no layer"):
        explain(r, base_dir=tmp_path)


# ---- 7. leftovers, modes, pickles, damaged folders, hints -----------------------------------------


def _leftover(parent: Path, prefix: str) -> Path:
    """A marked temporary folder made by a process that has ended (as a killed run leaves it)."""
    code = (
        "import sys; from pathlib import Path; from secateur.runtime.store.leftovers import new_partial_dir; "
        "d, _ = new_partial_dir(Path(sys.argv[1]), sys.argv[2], 'test'); "
        "(d / 'model.safetensors').write_text('partial'); print(d)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(parent), prefix], capture_output=True, text=True)
    return Path(out.stdout.strip())


def test_leftovers_of_a_killed_write_are_removed_and_modes_follow_umask(tmp_path: Path) -> None:
    r = _recipe(tmp_path)
    stale = _leftover(tmp_path, ".out.tmp-999999999-")
    users = tmp_path / ".out.tmp-999999999-mine"  # named like one, but not marked: never touched
    users.mkdir()
    assert stale.is_dir()
    old_mask = os.umask(0o022)
    try:
        out = prune(r, output=tmp_path / "out", progress=False, log=lambda s: None).output
    finally:
        os.umask(old_mask)
    assert not stale.exists() and users.is_dir()
    assert (out.stat().st_mode & 0o777) == 0o755
    assert ((out / "model.safetensors").stat().st_mode & 0o777) == 0o644


def test_displaced_old_output_is_put_back(tmp_path: Path) -> None:
    r = _recipe(tmp_path)
    out = prune(r, output=tmp_path / "out", progress=False, log=lambda s: None).output
    # a run killed between its two renames: the old output moved aside, the new not yet in place
    os.replace(out, tmp_path / ".out.old-999999999")
    with pytest.raises(OutputExistsError):
        prune(r, output=out, progress=False, log=lambda s: None)
    assert (out / MANIFEST).is_file() and not (tmp_path / ".out.old-999999999").exists()


def test_pickle_only_model_folder_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "pickled"
    save_tiny(str(d), "llama")
    (d / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="pickle.*safetensors"):
        load_model(str(d))


@pytest.mark.parametrize("damage", ["truncated", "bad-json", "no-config", "no-weights", "bad-layers"])
def test_damaged_output_gives_a_clear_error(tmp_path: Path, damage: str) -> None:
    out = _saved_with_removed_branch(tmp_path)
    if damage == "truncated":
        w = out / "model.safetensors"
        w.write_bytes(w.read_bytes()[:100])
    elif damage == "bad-json":
        (out / "config.json").write_text("{not json")
    elif damage == "no-config":
        (out / "config.json").unlink()
    elif damage == "no-weights":
        (out / "model.safetensors").unlink()
    else:
        meta = json.loads((out / "secateur.json").read_text())
        meta["layers"] = meta["layers"][:1]
        (out / "secateur.json").write_text(json.dumps(meta))
    err = FileNotFoundError if damage == "no-config" else PrunedFolderError
    with pytest.raises(err, match=str(out)):
        load_pruned(out)


def test_output_without_secateur_json_loads_from_the_weights_headers(tmp_path: Path) -> None:
    out = _saved_with_removed_branch(tmp_path)
    (out / "secateur.json").unlink()
    lm = load_model(str(out))
    assert lm.model.model.layers[1].self_attn.__class__.__name__ == "SkippedAttention"


def test_exponent_without_dot_gets_a_hint(tmp_path: Path) -> None:
    r = tmp_path / "r.yaml"
    r.write_text("budget: {params: 0.2}\nrestore: {damping: 1e-6}\n")
    with pytest.raises(RecipeError, match=r"restore\.damping.*write 1\.0e-6"):
        load_recipe(r)


# ---- kill -9 and a full disk: the old output or the complete new one, never debris ---------------


def _cli(args: list[str], **kw) -> subprocess.Popen:
    code = "import sys; from secateur.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw
    )


def _is_complete(out: Path) -> bool:
    return (
        (out / MANIFEST).is_file() and (out / "model.safetensors").is_file() and (out / LOCK_NAME).is_file()
    )


def test_kill_during_prune_leaves_old_or_new_output(tmp_path: Path) -> None:
    r = _recipe(tmp_path)
    out = tmp_path / "out"
    prune(r, output=out, progress=False, log=lambda s: None)
    first = (out / LOCK_NAME).read_text()
    rng = random.Random(int(os.environ.get("SECATEUR_KILL_SEED", "0")))
    for delay in sorted(rng.uniform(0.3, 6.0) for _ in range(3)):  # start-up, pruning, writing
        p = _cli(["prune", str(r), "-o", str(out), "--overwrite", "--quiet"])
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert _is_complete(out)  # the old output, or the complete new one
        assert (out / LOCK_NAME).read_text() == first  # same recipe: same lock either way
    prune(r, output=out, overwrite=True, progress=False, log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_disk_full_keeps_the_previous_output(tmp_path: Path) -> None:
    r = _recipe(tmp_path)
    out = tmp_path / "out"
    prune(r, output=out, progress=False, log=lambda s: None)
    before = (out / "model.safetensors").read_bytes()
    limit = "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); resource.setrlimit(resource.RLIMIT_FSIZE, (50000, 50000))"
    code = f"{limit}; import sys; from secateur.cli import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run(
        [sys.executable, "-c", code, "prune", str(r), "-o", str(out), "--overwrite", "--quiet"],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
    assert (out / "model.safetensors").read_bytes() == before and _is_complete(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_report_records_peak_memory_and_config_names_its_class(tmp_path: Path) -> None:
    r = _recipe(tmp_path)
    out = prune(r, output=tmp_path / "out", progress=False, log=lambda s: None)
    assert out.report["memory"]["peak_rss_bytes"] > 50 * 2**20  # torch alone is bigger than that
    assert "Peak resident memory" in (out.output / "report.md").read_text()
    cfg = json.loads((out.output / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "_name_or_path" not in cfg


def test_a_malformed_version_1_lock_is_refused_with_the_key(tmp_path: Path) -> None:
    from secateur.lock import read_lock

    old = tmp_path / LOCK_NAME  # version 1 re-applies (tests/test_lock_versions.py); a broken one says why
    old.write_text(yaml.safe_dump({"lock_version": 1, "recipe": {}, "kept": [], "fingerprints": {}}))
    with pytest.raises(LockError, match="fingerprints.model: expected a sha256"):
        read_lock(old)
