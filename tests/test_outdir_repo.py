"""The output folder as a model repository: dtype, shards, generation config, model card, and locks
that check the saved tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from secateur.api import prune
from secateur.lock import LOCK_NAME, LockError, tensor_fingerprint
from secateur.runtime.store.folder import weight_files
from secateur.runtime.store.io import load_pruned
from secateur.runtime.store.loader import ModelSource, gguf_dtype, source_dtype
from secateur.runtime.store.outdir import MANIFEST

from .test_reliability import _recipe


def _saved_tensors(out: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(out):
        state.update(load_file(str(f)))
    return state


def test_bf16_sharded_output_is_what_was_evaluated_and_the_lock_checks_it(tmp_path: Path) -> None:
    r = _recipe(tmp_path, evaluate=True, output={"dtype": "bfloat16", "max_shard_size": "30KB"})
    res = prune(r, output=tmp_path / "out", progress=False, log=lambda s: None)
    out = res.output
    saved = _saved_tensors(out)
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert (out / "model.safetensors.index.json").is_file() and len(weight_files(out)) > 1
    listed = set(json.loads((out / MANIFEST).read_text())["files"])
    assert {f.name for f in weight_files(out)} | {"model.safetensors.index.json"} <= listed
    # the lock's fingerprint is of the tensors in the files, and re-applying it reproduces them
    lock = yaml.safe_load((out / LOCK_NAME).read_text())
    assert lock["output_dtype"] == "bfloat16" and res.report["output_dtype"] == "bfloat16"
    assert tensor_fingerprint(list(saved.items())) == lock["fingerprints"]["pruned_model"]
    again = prune(lock_path=out / LOCK_NAME, output=tmp_path / "again", progress=False, log=lambda s: None)
    assert again.reproduced is True
    # the reported perplexity is the saved model's, evaluated in the working dtype
    from secateur.runtime.measure.evaluate import perplexity
    from secateur.runtime.store.data import eval_windows, load_text, tokenize_text
    from secateur.runtime.store.loader import load_model

    lm = load_model(str(out), dtype="float32", device="cpu")
    toks = tokenize_text(lm.tokenizer, load_text("calib.txt", "test", None, tmp_path))
    ppl = perplexity(lm.model, eval_windows(toks, 32, 2), batch_size=1)
    (key, reported), *_ = res.report["perplexity"]["pruned"].items()
    assert ppl == pytest.approx(reported, rel=1e-6)
    # a model card and generation config, listed in the manifest like every file
    assert {"README.md", "generation_config.json"} <= listed
    _check_card(out, res.report, plain=True)
    # a lock naming an unknown output dtype is refused before work
    lock["output_dtype"] = "int3"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(lock))
    with pytest.raises(LockError, match="output_dtype"):
        prune(lock_path=tmp_path / "bad.yaml", output=tmp_path / "bad", progress=False, log=lambda s: None)


def _check_card(out: Path, report: dict, plain: bool) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert "fasp" in card.data.tags and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model is None  # a local source: no local path in the card
    assert (card.data.library_name == "transformers") is plain
    assert ("AutoModelForCausalLM.from_pretrained" in card.text) is plain
    for text in ("secateur.load_pruned", "--format gguf", "--format decilm", "recipe.lock.yaml", "bfloat16"):
        assert text in card.text, text
    (key, ppl), *_ = report["perplexity"]["pruned"].items()
    assert f"{ppl:.2f}" in card.text and "prefill tokens/s" in card.text
    assert f"{report['size']['pruned']['params']:,}" in card.text


def test_source_dtype_is_the_checkpoints(tmp_path: Path) -> None:
    r = _recipe(tmp_path)  # writes the tiny fp32 source
    model_dir = tmp_path / "model"
    assert source_dtype(ModelSource(str(model_dir), str(model_dir))) == torch.float32
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert source_dtype(ModelSource(str(model_dir), str(model_dir))) == torch.bfloat16
    out = prune(r, output=tmp_path / "out", progress=False, log=lambda s: None).output
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_pruned(out).dtype == torch.bfloat16


def test_gguf_dtype_from_the_file_type(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    for ftype, want in (
        (gguf.LlamaFileType.MOSTLY_F16, torch.float16),
        (gguf.LlamaFileType.MOSTLY_Q4_1, torch.bfloat16),
    ):
        path = tmp_path / f"m{int(ftype)}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_file_type(int(ftype))
        w.add_tensor("x", np.zeros((2, 2), dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        assert gguf_dtype(path) == want


@pytest.mark.parametrize("bad", ["5 GiB", "lots", 0])
def test_bad_shard_size_is_a_recipe_error(tmp_path: Path, bad) -> None:
    from secateur.recipe.errors import RecipeError
    from secateur.recipe.load import load_recipe

    r = _recipe(tmp_path, output={"max_shard_size": bad})
    with pytest.raises(RecipeError, match="output.max_shard_size"):
        load_recipe(r)


def test_card_of_an_output_plain_transformers_cannot_load() -> None:
    from huggingface_hub import ModelCard

    from secateur.runtime.measure.card import render_card

    report = {"stages": [{"method": "flap"}], "size": {"dense": {"params": 10}, "pruned": {"params": 8}}}
    text = render_card(report, "flap-20", "HuggingFaceTB/SmolLM2-135M-Instruct", plain=False)
    card = ModelCard(text)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.library_name is None
    assert "from_pretrained(" not in text.replace("AutoTokenizer.from_pretrained(", "")
    assert "secateur.load_pruned" in text and "8 of 10 parameters (80.0%)" in text
