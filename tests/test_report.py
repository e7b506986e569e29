"""Reports: report.json keeps the data, report.md shows it, widths.png charts the layers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from secateur.runtime.measure.report import read_report, render_markdown, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _full_report() -> dict:
    dense_layer = {
        "num_heads": 9,
        "num_kv_heads": 3,
        "head_dim": 64,
        "v_head_dim": 64,
        "intermediate_size": 1536,
        "skip_attention": False,
        "skip_mlp": False,
    }
    layers = [
        dict(dense_layer, layer=0, num_heads=6, intermediate_size=1024),
        dict(dense_layer, layer=1, num_heads=0, num_kv_heads=0, skip_attention=True, intermediate_size=768),
        dict(dense_layer, layer=2, intermediate_size=0, skip_mlp=True),
    ]
    return {
        "recipe_yaml": "name: half-mlp\nmodel:\n  id: smollm2-135m\n",
        "size": {
            "dense": {"params": 134515008, "decoder_linear_params": 106168320, "flops_per_token": 271000000},
            "pruned": {"params": 100000000, "decoder_linear_params": 71653312, "flops_per_token": 200000000},
        },
        "layers": layers,
        "dense_layer": dense_layer,
        "perplexity": {"dense": {"wikitext2:test@2048": 20.9876}, "pruned": {"wikitext2:test@2048": 31.4159}},
        "zeroshot": {
            "dense": {
                "piqa": {"acc": 0.6812, "acc_norm": 0.6701},
                "winogrande": {"acc": 0.5233},
                "mean": {"acc": 0.60225, "acc_norm": 0.6701},
            },
            "pruned": {
                "piqa": {"acc": 0.6123, "acc_norm": 0.6034, "acc_stderr": 0.0114, "acc_norm_stderr": 0.0115},
                "winogrande": {"acc": 0.5012},
                "mean": {"acc": 0.55675, "acc_norm": 0.6034},
            },
        },
        "speed": {
            "dense": {
                "prefill_tok_s": 1234.5,
                "decode_tok_s": 45.6,
                "prefill_s_median": 0.41,
                "decode_s_median": 0.7,
                "weights_bytes": 538060032,
                "peak_mem_bytes": None,
                "device": "cpu",
            },
            "pruned": {
                "prefill_tok_s": 1800.25,
                "decode_tok_s": 60.5,
                "prefill_s_median": 0.28,
                "decode_s_median": 0.53,
                "weights_bytes": 400000000,
                "peak_mem_bytes": None,
                "device": "cpu",
            },
            "ratios": {"prefill_speedup": 1.4583, "decode_speedup": 1.3268, "weights_ratio": 0.7434},
            "device": "cpu",
        },
        "phases": {"load": 3.5, "prune": 42.25, "evaluate": 10.0},
        "layer_log": [{"layer": 0, "seconds": 1.0}],
        "lock_fingerprint": "deadbeef" * 8,
        "device": "cpu",
        "dtype": "float32",
    }


def test_full_report(tmp_path: Path) -> None:
    report = _full_report()
    write_report(tmp_path, report)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    md = read_report(tmp_path)
    assert md == (tmp_path / "report.md").read_text()
    for section in ("## Recipe", "## Size", "## Per-layer widths", "## Quality", "## Speed", "## Timing"):
        assert section in md
    assert "name: half-mlp" in md
    assert "134,515,008" in md and "100,000,000" in md and "0.743x" in md  # params and ratio
    assert "20.99" in md and "31.42" in md  # perplexity, 2 decimals
    assert "0.6812" in md and "0.6123" in md and "-0.0689" in md  # piqa acc and its change
    assert md.index("| piqa") < md.index("| **mean**")
    assert "0.6123 ± 0.0114" in md and "0.6034 ± 0.0115" in md  # lm-eval's standard errors beside
    assert "0.5012 |" in md  # no stderr recorded: none shown
    assert "1,234.5" in md and "1,800.2" in md and "1.458x" in md  # throughput and speedup
    assert "| 0 | 6/9 (0.67) | 3/3 (1.00) | 1024/1536 (0.67) | kept | kept |" in md.replace(",", "")
    assert "| 1 | 0/9 (0.00) | 0/3 (0.00) | 768/1536 (0.50) | removed | kept |" in md.replace(",", "")
    assert "| **total** | 55.75 |" in md
    assert "deadbeef" * 8 in md
    assert "(widths.png)" in md
    assert (tmp_path / "widths.png").read_bytes()[:8] == PNG_MAGIC


def test_partial_report(tmp_path: Path) -> None:
    report = {
        "size": {"dense": {"params": 1000}, "pruned": {"params": 500}},
        "perplexity": {"dense": {"wikitext2": 12.345}, "pruned": {"wikitext2": 13.5}},
    }
    write_report(tmp_path / "out", report)
    md = read_report(tmp_path / "out")
    assert "## Size" in md and "0.500x" in md and "12.35" in md
    for absent in ("## Recipe", "## Per-layer", "## Speed", "## Timing", "## Lock", "Zero-shot"):
        assert absent not in md
    assert not (tmp_path / "out" / "widths.png").exists()
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report


def test_empty_report_and_layers_without_dense_shapes(tmp_path: Path) -> None:
    assert render_markdown({}).startswith("# Secateur report")
    layers = [
        {
            "num_heads": 2,
            "num_kv_heads": 1,
            "intermediate_size": 10,
            "skip_attention": False,
            "skip_mlp": False,
        }
    ]
    write_report(tmp_path, {"layers": layers, "lock_fingerprint": "abc"})
    md = read_report(tmp_path)
    assert "| 0 | 2 | 1 | 10 | kept | kept |" in md and "`abc`" in md
    assert "widths.png" not in md


def test_read_report_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_report(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path.name}.*report\.md"):
        read_report(tmp_path)
