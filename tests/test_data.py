"""Datasets resolve to local files, join like the HF loader, and windows are seeded and disjoint."""

from __future__ import annotations

import pytest
import torch

from secateur.runtime.store.data import (
    DATA_ROOT_ENV,
    DataError,
    calibration_windows,
    default_data_root,
    eval_windows,
    load_text,
    resolve_text_source,
    split_tokens,
    tokenize_text,
)

RAW = " \n = Title = \n \n Body line one .\n\t\n Body two . \n"


class CharTokenizer:
    """Stand-in for an HF tokenizer: one id per character."""

    class _Enc:
        def __init__(self, ids: list[int]) -> None:
            self.input_ids = ids

    def __call__(self, text: str) -> _Enc:
        return self._Enc([ord(c) % 128 for c in text])


def _root(tmp_path, text: str = RAW):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text(text, encoding="utf-8")
    return tmp_path


def test_wikitext_protocol_on_small_file(tmp_path) -> None:
    root = _root(tmp_path)
    text = load_text("wikitext2", "test", data_root=root)
    rows = ["", " = Title = \n", "", " Body line one .\n", "", " Body two . \n"]
    assert text == "\n\n".join(rows)
    assert load_text("wikitext2-raw", "test", data_root=root) == text
    # a .raw path uses the same protocol; a .txt path is read verbatim
    assert load_text("wikitext2/wiki.test.raw", "test", base_dir=root) == text
    (root / "plain.txt").write_text(RAW)
    assert load_text(str(root / "plain.txt"), "test") == RAW


def test_real_wikitext2_test_split(data_root) -> None:
    text = load_text("wikitext2", "test", data_root=data_root)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English")
    rows = text.split("\n\n")
    assert sum(1 for r in rows if r.strip()) >= 2891
    assert 1_290_000 < len(text) < 1_300_000
    valid = resolve_text_source("wikitext2", "validation", data_root=data_root)
    assert valid == data_root / "wikitext2" / "wiki.valid.raw"


def test_default_root_honours_env(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(DATA_ROOT_ENV, str(tmp_path))
    assert default_data_root() == tmp_path
    with pytest.raises(DataError, match=DATA_ROOT_ENV):
        resolve_text_source("wikitext2", "test")


def test_missing_files_and_train_split_are_clear(tmp_path) -> None:
    root = _root(tmp_path)
    with pytest.raises(DataError, match=r"wikitext2 split train: .*wiki\.train\.raw.*SECATEUR_DATA_ROOT"):
        resolve_text_source("wikitext2", "train", data_root=root)
    with pytest.raises(DataError, match=r"split validation: .*wiki\.valid\.raw not found"):
        resolve_text_source("wikitext2", "validation", data_root=root)
    with pytest.raises(DataError, match="nope.txt"):
        resolve_text_source("nope.txt", "test", base_dir=root)
    with pytest.raises(DataError, match="not known"):
        resolve_text_source("c4", "test", data_root=root)
    with pytest.raises(DataError, match="split 'dev'"):
        resolve_text_source("wikitext2", "dev", data_root=root)
    assert resolve_text_source("hf:wikitext:wikitext-2-raw-v1", "test") == "hf:wikitext:wikitext-2-raw-v1"


def test_jsonl_rows_and_errors(tmp_path) -> None:
    good = tmp_path / "c.jsonl"
    good.write_text('{"text": "a b"}\n\n{"text": "c", "id": 2}\n')
    assert load_text(str(good), "test") == "a b\n\nc"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: .*'text'"):
        load_text(str(bad), "test")
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_text(str(bad), "test")


def test_tokenize_accepts_hf_like_tokenizers() -> None:
    ids = tokenize_text(CharTokenizer(), "abc")
    assert ids.dtype == torch.long and ids.tolist() == [[97, 98, 99]]
    assert tokenize_text(lambda t: {"input_ids": [[1, 2]]}, "x").tolist() == [[1, 2]]


def test_calibration_windows_are_seeded() -> None:
    tokens = torch.arange(1000).unsqueeze(0)
    a = calibration_windows(tokens, 8, 32, seed=0)
    assert a.shape == (8, 32)
    assert torch.equal(a, calibration_windows(tokens, 8, 32, seed=0))
    assert not torch.equal(a, calibration_windows(tokens, 8, 32, seed=1))
    # every window is a contiguous slice of the stream
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 31, dtype=torch.long))
    assert calibration_windows(torch.arange(33), 2, 32, seed=0).shape == (2, 32)
    with pytest.raises(DataError, match="calibration set has 32 tokens, fewer than seqlen=32"):
        calibration_windows(torch.arange(32), 2, 32, seed=0)


def test_split_and_eval_windows() -> None:
    tokens = torch.arange(100).unsqueeze(0)
    head, tail = split_tokens(tokens, 0.8)
    assert head.shape == (1, 80) and tail.shape == (1, 20)
    cal = calibration_windows(head, 4, 10, seed=0)
    held = calibration_windows(tail, 4, 10, seed=0)
    assert set(cal.flatten().tolist()).isdisjoint(held.flatten().tolist())
    w = eval_windows(tokens, 30)
    assert w.shape == (3, 30) and w[1, 0] == 30
    assert eval_windows(tokens, 30, max_windows=2).shape == (2, 30)
    with pytest.raises(DataError, match="fewer than seqlen=200"):
        eval_windows(tokens, 200)


@pytest.mark.integration
def test_smollm2_tokenizes_wikitext(smollm2, data_root) -> None:
    text = load_text("wikitext2", "test", data_root=data_root)[:2000]
    ids = tokenize_text(smollm2.tokenizer, text)
    assert ids.shape[0] == 1 and 200 < ids.shape[1] < 2000
