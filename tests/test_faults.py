"""Fault injection (issue 29): corrupted inputs, killed runs, a full disk and a tampered variant
database each end in one clear line naming the file, a non-zero exit and nothing half-written."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from secateur.cli import main
from secateur.runtime.store import leftovers
from secateur.testing import save_tiny, save_tiny_gguf, tiny_recipe

# more text per window than tiny_recipe's, and the recipe's default held-out windows
BIG_CALIBRATION = {"n_samples": 16, "seqlen": 128, "heldout_windows": None}


def _fails_cleanly(capsys, args: list[str], *needles: str) -> str:
    assert main(args) == 2  # an uncaught exception (a traceback) would fail the test here
    err = capsys.readouterr().err
    assert "Traceback" not in err and all(n in err for n in needles), err
    return err


@pytest.mark.parametrize(
    "damage",
    [
        lambda f: f.write_bytes(f.read_bytes()[:5000]),  # truncated
        lambda f: f.write_bytes(os.urandom(100)),  # garbage
        lambda f: f.write_bytes(b""),  # empty
    ],
    ids=["truncated", "garbage", "empty"],
)
def test_a_damaged_safetensors_source_is_named_and_nothing_is_written(tmp_path, capsys, damage) -> None:
    save_tiny(str(tmp_path / "bad"), "llama")
    damage(tmp_path / "bad" / "model.safetensors")
    r = tiny_recipe(tmp_path, "bad")
    _fails_cleanly(capsys, ["prune", str(r), "-o", str(tmp_path / "out"), "--quiet"], "bad/model.safetensors")
    _fails_cleanly(
        capsys, ["eval", str(tmp_path / "bad"), "--tasks", "", "--ppl-seqlen", "16"], "model.safetensors"
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]


@pytest.mark.parametrize("kind", ["100 bytes", "truncated"])
def test_a_broken_gguf_is_named(tmp_path, capsys, kind) -> None:
    f = tmp_path / "x.gguf"
    if kind == "100 bytes":
        f.write_bytes(b"GGUF" + os.urandom(96))
    else:
        save_tiny_gguf(str(tmp_path / "ok.gguf"))
        f.write_bytes((tmp_path / "ok.gguf").read_bytes()[:3000])
    r = tiny_recipe(tmp_path, "x.gguf")
    _fails_cleanly(capsys, ["prune", str(r), "-o", str(tmp_path / "out"), "--quiet"], "x.gguf")
    _fails_cleanly(capsys, ["graph", str(f)], "x.gguf")


def test_damaged_tokenizer_and_binary_calibration_text_are_named(tmp_path, capsys) -> None:
    save_tiny(str(tmp_path / "tok"), "llama")
    (tmp_path / "tok" / "tokenizer.json").write_text("garbage")
    _fails_cleanly(
        capsys,
        ["prune", str(tiny_recipe(tmp_path, "tok")), "-o", str(tmp_path / "o")],
        "cannot load its tokenizer",
    )
    (tmp_path / "bin.txt").write_bytes(b"\xa0\xff" * 2000)
    r = tiny_recipe(
        tmp_path, calibration={"dataset": "bin.txt", "n_samples": 2, "seqlen": 32, "heldout_windows": None}
    )
    _fails_cleanly(capsys, ["prune", str(r), "-o", str(tmp_path / "o"), "--quiet"], "bin.txt: not UTF-8 text")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_source_weights_fail_naming_the_tensor(tmp_path, capsys, value) -> None:
    save_tiny(str(tmp_path / "p"), "llama")
    st = load_file(str(tmp_path / "p" / "model.safetensors"))
    st["model.layers.1.mlp.up_proj.weight"][3, 5] = value
    save_file(st, str(tmp_path / "p" / "model.safetensors"), metadata={"format": "pt"})
    args = ["prune", str(tiny_recipe(tmp_path, "p")), "-o", str(tmp_path / "o"), "--quiet"]
    _fails_cleanly(capsys, args, "model.layers.1.mlp.up_proj.weight holds 1 non-finite")
    assert not (tmp_path / "o").exists()


def test_hostile_output_paths_touch_nothing(tmp_path, capsys) -> None:
    r = tiny_recipe(tmp_path)
    assert main(["prune", str(r), "-o", str(tmp_path / "run"), "--quiet"]) == 0
    (tmp_path / "user.txt").write_text("mine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for target, needle in [
        (tmp_path / "m", "which this run reads"),  # the source model
        (tmp_path, "which this run reads"),  # the recipe's folder
        (tmp_path / "user.txt", "is not a folder"),  # a user's file
        (tmp_path / "run" / "sub", "lies inside the Secateur output"),
    ]:
        _fails_cleanly(capsys, ["prune", str(r), "-o", str(target), "--overwrite", "--quiet"], needle)
    for target in [tmp_path / "m" / "model.safetensors", tmp_path / "user.txt", tmp_path / "run" / "x.gguf"]:
        _fails_cleanly(
            capsys, ["export", str(tmp_path / "run"), "--format", "decilm", "-o", str(target), "--overwrite"]
        )
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def _start_big_prune(tmp_path: Path, out: Path, **popen: Any) -> subprocess.Popen:
    """A streamed prune of an 8-layer model into `out`, in a child process (long enough to be signalled)."""
    save_tiny(str(tmp_path / "big"), "llama", num_hidden_layers=8, intermediate_size=512, hidden_size=256)
    r = tiny_recipe(tmp_path, "big", calibration=BIG_CALIBRATION)
    code = "import sys; from secateur.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "prune", str(r), "-o", str(out), "--quiet", "--stream"]
    return subprocess.Popen(argv, **popen)


def _kill_during_save(tmp_path: Path, out: Path) -> Path:
    p = _start_big_prune(tmp_path, out)
    deadline = time.monotonic() + 120
    # kill once the first weights are being written into the temporary folder
    while not any(
        q.name.startswith(f".{out.name}.tmp-") and any(f.suffix == ".partial" for f in q.iterdir())
        for q in out.parent.iterdir()
    ):
        assert p.poll() is None and time.monotonic() < deadline, "the temporary output never appeared"
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)
    p.wait()
    (left,) = [q for q in out.parent.iterdir() if q.name.startswith(f".{out.name}.tmp-")]
    return left


def test_a_killed_runs_leftover_is_listed_then_removed_by_clean(tmp_path, capsys) -> None:
    (tmp_path / "runs").mkdir()
    left = _kill_during_save(tmp_path, tmp_path / "runs" / "out")
    users = tmp_path / "runs" / ".out.tmp-1-mine"  # named like one, not marked: never touched
    users.mkdir()
    assert main(["clean", str(tmp_path / "runs")]) == 0  # dry run
    out = capsys.readouterr().out
    assert f"would remove: {left}" in out and "nothing removed (dry run)" in out and left.is_dir()
    assert main(["clean", str(tmp_path / "runs"), "--yes"]) == 0
    assert f"removed: {left}" in capsys.readouterr().out
    assert not left.exists() and users.is_dir()
    # its registry entry went with it (clean PATH used to leave it for a later run to drop)
    assert not [e for e in leftovers.registry_dir().glob("*.json") if str(left) in e.read_text()]


def test_any_later_run_removes_a_killed_runs_leftover(tmp_path, capsys) -> None:
    (tmp_path / "a").mkdir()
    left = _kill_during_save(tmp_path, tmp_path / "a" / "out")
    elsewhere = tmp_path / "b" / "other"  # another output folder altogether
    assert main(["prune", str(tiny_recipe(tmp_path)), "-o", str(elsewhere), "--quiet"]) == 0
    assert not left.exists() and "removed 1 leftover(s) of killed runs" in capsys.readouterr().err
    assert leftovers.find([tmp_path], deep=True) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_ctrl_c_during_save_cleans_up(tmp_path, sig) -> None:
    (tmp_path / "runs").mkdir()
    out = tmp_path / "runs" / "out"
    p = _start_big_prune(
        tmp_path,
        out,
        stderr=subprocess.PIPE,
        text=True,
        # as from a terminal: started from a background shell, SIGINT would be ignored (and so Ctrl-C)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    while not any(q.name.startswith(".out.tmp-") for q in out.parent.iterdir()):
        assert p.poll() is None
        time.sleep(0.01)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig and "Traceback" not in err  # Ctrl-C: one line, exit 130
    assert ("terminated" if sig == signal.SIGTERM else "interrupted") in err
    assert list(out.parent.iterdir()) == []


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


def test_disk_full_on_a_small_tmpfs_is_a_message_and_leaves_nothing(tmp_path, capsys) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if not _can_mount_tmpfs(disk):
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        r = tiny_recipe(tmp_path)
        assert main(["prune", str(r), "-o", str(disk / "out"), "--quiet"]) != 0
        err = capsys.readouterr().err
        assert "No space left on device" in err and "Traceback" not in err
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("damage", ["tampered", "truncated"])
def test_a_bad_variant_file_is_rebuilt_not_stitched(tmp_path, damage) -> None:
    from secateur.graph.adapters import adapter_for
    from secateur.graph.keep import LayerKeep
    from secateur.runtime.allocation.variants import Variant, VariantStore
    from secateur.testing import tiny_model

    m = tiny_model("llama")
    w = m.model.layers[0].mlp.down_proj.weight.detach()[:, :8].clone()
    good = Variant(LayerKeep(mlp=list(range(8))), {"mlp.down_proj": (w, None)})
    store = VariantStore(tmp_path, {"k": 1})
    store.get(0, "mlp", 8, lambda: good)
    f = store.path(0, "mlp", 8)
    if damage == "tampered":
        st = load_file(str(f))
        st["weight.mlp.down_proj"] += 1.0
        from safetensors import safe_open

        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata()
        save_file(st, str(f), metadata=meta)
    else:
        f.write_bytes(f.read_bytes()[:200])
    fresh = VariantStore(tmp_path, {"k": 1})  # no memo: reads the file
    with pytest.warns(UserWarning, match=f"{f.name} is .*rebuilding it"):
        got = fresh.get(0, "mlp", 8, lambda: good)
    assert torch.equal(got.weights["mlp.down_proj"][0], w) and fresh.built == 1
    assert torch.equal(
        VariantStore(tmp_path, {"k": 1}).get(0, "mlp", 8, lambda: None).weights["mlp.down_proj"][0], w
    )
    assert adapter_for(m.config) is not None
