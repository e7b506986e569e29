"""Healing (recipe `heal:`): distillation from the dense model on tiny real models through
Hugging Face Trainer — the loss, what trains, save/load, resume after kill -9, locks, bad data."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from secateur.api import prune
from secateur.graph.adapters import adapter_for
from secateur.graph.keep import LayerKeep
from secateur.recipe.errors import RecipeError
from secateur.recipe.heal import Heal
from secateur.recipe.load import load_recipe
from secateur.runtime.heal.data import self_generated, text_sequences
from secateur.runtime.heal.loss import rest_logmass, topk_kl
from secateur.runtime.heal.teacher import teacher_targets
from secateur.runtime.heal.train import run_trainer
from secateur.runtime.prune.surgery import apply_keep
from secateur.runtime.store.fingerprint import model_fingerprint
from secateur.runtime.store.io import load_pruned
from secateur.testing import tiny_model, tiny_tokenizer
from tests.test_prune import _recipe, _text


@pytest.fixture(autouse=True)
def _heal_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SECATEUR_HEAL_DIR", str(tmp_path / "heal-work"))


def _small_heal(**over) -> Heal:
    base = dict(tokens=8 * 32 * 6, seqlen=32, batch=8, micro_batch=4, lr=3e-3, top_k=16, checkpoint_every=2)
    return Heal(**(base | over))


def _pruned_tiny(family: str = "llama"):
    m = tiny_model(family)
    tok = tiny_tokenizer()
    return m, tok, adapter_for(m.config)


def test_topk_kl_is_the_exact_kl_when_k_covers_the_vocabulary() -> None:
    g = torch.Generator().manual_seed(0)
    t_logits, s_logits = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    t_logp = torch.log_softmax(t_logits, -1)
    full = (t_logp.exp() * (t_logp - torch.log_softmax(s_logits, -1))).sum(-1).mean()
    v, i = t_logp.topk(11, -1)
    assert torch.allclose(topk_kl(s_logits, i, v, rest_logmass(v)), full, atol=1e-4)
    v4, i4 = t_logp.topk(4, -1)  # coarser: the KL of the merged distribution is never larger
    assert topk_kl(s_logits, i4, v4, rest_logmass(v4)) <= full + 1e-6
    assert topk_kl(t_logits, i4, v4, rest_logmass(v4)).abs() < 1e-5  # the teacher against itself


def test_heal_lowers_the_kl_on_per_layer_shaped_and_branch_removed_models() -> None:
    m, tok, ad = _pruned_tiny()
    heal = _small_heal()
    w = self_generated(m, tok, heal.sequences, heal.seqlen, 1.0, 0, progress=False)
    t = teacher_targets(m, w, heal.top_k, progress=False)
    apply_keep(
        m,
        ad,
        {
            0: LayerKeep(mlp=list(range(0, 96, 2))),
            1: LayerKeep(drop_attn=True, mlp=list(range(40))),
            2: LayerKeep(drop_mlp=True),
        },
    )
    shapes = [(n, p.shape) for n, p in m.named_parameters()]

    def kl() -> float:
        with torch.no_grad():
            return topk_kl(m(input_ids=w).logits, t.idx, t.logp, t.rest).item()

    before = kl()
    r = run_trainer(
        m, heal, w, t, Path(os.environ["SECATEUR_HEAL_DIR"]) / "x", {0, 1, 2}, ad.layers(m), print, False
    )
    assert kl() < 0.8 * before
    assert [(n, p.shape) for n, p in m.named_parameters()] == shapes  # healing never changes shapes
    assert r.steps == 6 and r.tokens == 6 * 8 * 32 and r.loss
    assert not any(p.requires_grad for p in m.parameters()) and not m.training


def test_trainable_choices_touch_only_what_they_say() -> None:
    m, tok, ad = _pruned_tiny()
    w = self_generated(m, tok, 8, 32, 1.0, 0, progress=False)
    t = teacher_targets(m, w, 16, progress=False)
    apply_keep(m, ad, {1: LayerKeep(mlp=list(range(48)))})
    emb = m.get_input_embeddings().weight.clone()
    layer0 = {n: p.clone() for n, p in ad.layers(m)[0].named_parameters()}
    heal = _small_heal(tokens=8 * 32, train="pruned")
    run_trainer(m, heal, w, t, Path(os.environ["SECATEUR_HEAL_DIR"]) / "p", {1}, ad.layers(m), print, False)
    assert torch.equal(m.get_input_embeddings().weight, emb)  # frozen embeddings
    assert all(torch.equal(p, layer0[n]) for n, p in ad.layers(m)[0].named_parameters())  # unpruned layer
    lora = _small_heal(tokens=8 * 32, train="lora")
    shapes = {n: p.shape for n, p in m.named_parameters()}
    before = ad.layers(m)[1].mlp.down_proj.weight.clone()
    run_trainer(m, lora, w, t, Path(os.environ["SECATEUR_HEAL_DIR"]) / "l", {1}, ad.layers(m), print, False)
    assert {n: p.shape for n, p in m.named_parameters()} == shapes  # adapters merged away
    assert not torch.equal(ad.layers(m)[1].mlp.down_proj.weight, before)


def test_text_sequences_are_seeded_and_report_repeats() -> None:
    toks = torch.arange(1000)
    a, passes = text_sequences(toks, 40, 32, seed=1)
    b, _ = text_sequences(toks, 40, 32, seed=1)
    assert torch.equal(a, b) and a.shape == (40, 32) and passes == 2
    small, _ = text_sequences(toks, 8, 32, seed=1)
    assert torch.equal(small, a[:8])


def test_self_generated_text_is_a_prefix_of_a_larger_budget(tmp_path: Path) -> None:
    m, tok, _ = _pruned_tiny()
    cache = tmp_path / "s.pt"
    big = self_generated(m, tok, 100, 16, 1.0, 3, cache, progress=False)  # two sampling batches
    small = self_generated(m, tok, 20, 16, 1.0, 3, None, progress=False)
    assert torch.equal(big[:20], small) and big.shape == (100, 16)
    assert not torch.equal(big[:10], big[64:74])  # each batch has its own seed
    assert torch.equal(self_generated(m, tok, 100, 16, 1.0, 3, cache, progress=False), big)  # from the cache


def _heal_recipe(tmp: Path, **heal) -> Path:
    path = _recipe(
        tmp, targets={"mlp": True, "attention": "q_head"}, budget={"params": 0.3, "multiple_of": 4}
    )
    doc = yaml.safe_load(path.read_text())
    doc["heal"] = {"tokens": 8 * 32 * 4, "seqlen": 32, "lr": 0.003, "top_k": 16, "checkpoint_every": 2} | heal
    path.write_text(yaml.safe_dump(doc))
    return path


def test_prune_with_heal_saves_loads_and_relocks_bit_for_bit(tmp_path: Path) -> None:
    # text like the evaluation text (a random tiny model's own samples say nothing about it)
    _text(tmp_path / "heal.txt", seed=1)
    path = _heal_recipe(tmp_path, data={"dataset": "heal.txt", "split": "train"})
    res = prune(path, output=tmp_path / "out", progress=False, log=lambda s: None)
    rep = res.report
    (h,) = rep["heal"]
    assert h["after_stage"] == 1 and h["data"]["source"] == "heal.txt" and h["steps"] == 4
    before = h["before"]["perplexity"]
    after = rep["perplexity"]["pruned"]
    assert before.keys() == after.keys() and all(after[k] < before[k] for k in before)  # healing helps
    assert res.lock["heal"][0]["data_fingerprint"] == h["data"]["fingerprint"]
    assert (tmp_path / "out" / "heal.png").is_file() and "## Healing" in (
        tmp_path / "out" / "report.md"
    ).read_text()
    assert "## Healing" in (tmp_path / "out" / "README.md").read_text()  # the model card says it was healed
    assert not Path(h["work_dir"]).exists()  # checkpoints dropped once the output is saved
    loaded = load_pruned(tmp_path / "out", dtype=torch.float32)
    assert model_fingerprint(loaded) == res.report["lock_fingerprint"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)  # uniform shapes
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, loaded(ids).logits)
    again = prune(
        lock_path=tmp_path / "out" / "recipe.lock.yaml",
        output=tmp_path / "again",
        progress=False,
        log=lambda s: None,
    )
    assert again.reproduced and again.report["lock_fingerprint"] == res.report["lock_fingerprint"]


# the child heals as a user's run does, but lingers after step 7 (checkpoint 6 written), so the
# kill lands mid-heal however fast the machine is (a quiet one finishes the whole heal in seconds)
_KILLED = """
import sys, time
from secateur.api import prune
from secateur.runtime.heal import train
logged = train._Progress.on_log
def linger(self, args, state, control, logs=None, **kw):
    logged(self, args, state, control, logs=logs, **kw)
    if state.global_step >= 7:
        time.sleep(120)
train._Progress.on_log = linger
prune(sys.argv[1], output=sys.argv[2], progress=False, log=lambda s: print(s, flush=True))
"""


def test_resume_after_kill_gives_the_uninterrupted_weights(tmp_path: Path) -> None:
    path = _heal_recipe(tmp_path, tokens=8 * 32 * 12, checkpoint_every=3)
    doc = yaml.safe_load(path.read_text())
    doc["evaluate"]["enabled"] = False
    path.write_text(yaml.safe_dump(doc))
    work = Path(os.environ["SECATEUR_HEAL_DIR"]) / "runs"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED, str(path), str(tmp_path / "killed")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list(work.glob("*/checkpoint-6/trainer_state.json")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(work.glob("*/checkpoint-*")), "the child never wrote a checkpoint"
    assert not (tmp_path / "killed").exists()
    resumed = prune(path, output=tmp_path / "killed", progress=False, log=lambda s: None)
    assert resumed.report["heal"][0]["resumed_from"] >= 3
    straight = prune(path, output=tmp_path / "straight", progress=False, log=lambda s: None)
    assert straight.report["heal"][0]["resumed_from"] is None
    assert resumed.report["lock_fingerprint"] == straight.report["lock_fingerprint"]


def test_heal_refuses_test_splits_and_evaluation_files(tmp_path: Path) -> None:
    path = _heal_recipe(tmp_path, data={"dataset": "wikitext2", "split": "test"})
    with pytest.raises(RecipeError, match="heal.data.split.*never trains on a test split"):
        load_recipe(path)
    path = _heal_recipe(
        tmp_path, data={"dataset": "calib.txt", "split": "train"}
    )  # the recipe evaluates on it
    with pytest.raises(ValueError, match="also an evaluation set"):
        prune(path, output=tmp_path / "o", progress=False, log=lambda s: None)
    assert not (tmp_path / "o").exists()


def test_heal_cannot_stream(tmp_path: Path) -> None:
    path = _heal_recipe(tmp_path)
    with pytest.raises(ValueError, match="healing trains the whole pruned model"):
        prune(path, output=tmp_path / "o", progress=False, log=lambda s: None, stream=True)


def test_heal_between_passes_and_after_flap_biases(tmp_path: Path) -> None:
    """A pass's own heal runs after it, the recipe's after the last; FLAP's added biases train and
    save (per-layer shapes: load_pruned reads them)."""
    _text(tmp_path / "heal.txt", seed=1)
    small = {"tokens": 8 * 32 * 2, "seqlen": 32, "lr": 0.003, "top_k": 16, "data": {"dataset": "heal.txt"}}
    path = _recipe(
        tmp_path,
        targets={"mlp": True, "attention": "none"},
        budget={"params": 0.3, "multiple_of": 4},
        passes=[
            {
                "name": "flap",
                "method": "flap",
                "share": 0.5,
                "targets": {"mlp": True, "attention": "none"},
                "importance": {"metric": "fluctuation"},
                "restore": {"method": "bias_compensation"},
                "heal": small,
            },
            {"name": "fasp", "method": "fasp", "share": 0.5, "targets": {"mlp": True, "attention": "none"}},
        ],
        heal=small | {"train": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}},
        output={"export": [{"format": "gguf", "outtype": "f32", "tokenizer_gguf": None}]},
    )
    doc = yaml.safe_load(path.read_text())
    del doc["output"]  # the tiny model has no GGUF tokenizer: exports are covered by test_export
    path.write_text(yaml.safe_dump(doc))
    res = prune(path, output=tmp_path / "out", progress=False, log=lambda s: None)
    assert [h["after_stage"] for h in res.report["heal"]] == [1, 2]
    assert res.report["heal"][1]["config"]["train"] == "lora" and len(res.lock["heal"]) == 2
    ours = load_pruned(tmp_path / "out", dtype=torch.float32)
    assert any(n.endswith("down_proj.bias") for n, _ in ours.named_parameters())  # FLAP's compensation
    assert model_fingerprint(ours) == res.report["lock_fingerprint"]


def test_a_checkpoint_cut_short_by_a_kill_is_skipped(tmp_path: Path) -> None:
    from secateur.runtime.heal.train import last_complete_checkpoint

    for step, state in ((3, '{"global_step": 3}'), (6, None)):  # 6: killed before trainer_state.json
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"x")
        if state:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")
    assert not (tmp_path / "checkpoint-6").exists()
