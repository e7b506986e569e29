"""bench/_results.py: a benchmark rewriting its table keeps the reading notes written under it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_results", REPO / "bench" / "_results.py")
assert _spec is not None and _spec.loader is not None
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)


def test_rewrite_keeps_notes_and_replaces_table(tmp_path: Path) -> None:
    out = tmp_path / "res" / "methods"
    results.write_results(out, [{"ppl": 1.0}], ["# table", "| a |", "| 1 |"])
    md = out.with_suffix(".md")
    assert md.read_text() == "# table\n| a |\n| 1 |\n"
    md.write_text(md.read_text() + f"\n{results.NOTES}\nReading: row 1 is the dense model.\n")

    results.write_results(out, [{"ppl": 1.0}, {"ppl": 2.0}], ["# table", "| a |", "| 1 |", "| 2 |"])
    text = md.read_text()
    assert text.startswith("# table\n| a |\n| 1 |\n| 2 |\n")
    assert text.endswith(f"{results.NOTES}\nReading: row 1 is the dense model.\n")
    assert text.count(results.NOTES) == 1
    assert json.loads(out.with_suffix(".json").read_text()) == [{"ppl": 1.0}, {"ppl": 2.0}]
    assert sorted(p.name for p in md.parent.iterdir()) == ["methods.json", "methods.md"]  # no temp file left


def test_without_marker_nothing_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "fasp"
    out.with_suffix(".md").write_text("# old table\nold words\n")
    results.write_results(out, {"rows": []}, ["# new table"])
    assert out.with_suffix(".md").read_text() == "# new table\n"
    assert results.kept_notes(tmp_path / "absent.md") == ""


def test_tradeoff_plot_written_only_with_measured_speedups(tmp_path: Path) -> None:
    dense = {"method": "dense", "ratio": 0.0, "ppl": 20.0}
    row = {"method": "fasp", "ratio": 0.2, "ppl": 26.0, "prefill_speedup": 1.1, "decode_speedup": 1.05}
    png = results.plot_tradeoff([dense, row], tmp_path / "m.png", "tiny")
    assert png == tmp_path / "m.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        results.plot_tradeoff(
            [dense, {k: v for k, v in row.items() if "speedup" not in k}], tmp_path / "n.png", "t"
        )
        is None
    )
    assert not (tmp_path / "n.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.png"]  # no temp file left


def test_earlier_results_only_when_asked_and_present(tmp_path: Path) -> None:
    out = tmp_path / "quality"
    assert results.earlier_results(out, True, {"rows": []}) == {"rows": []}  # no earlier run
    results.write_results(out, {"rows": [{"ppl": 3.0}]}, ["# table"])
    assert results.earlier_results(out, False, {}) == {}  # not --append: start afresh
    assert results.earlier_results(out, True, {}) == {"rows": [{"ppl": 3.0}]}
    assert results.earlier_results(str(out.with_suffix(".md")), True, {}) == {"rows": [{"ppl": 3.0}]}
