"""Locks are forever (issue 29): a lock of every version ever written re-applies and verifies.

tests/data/locks holds one lock per version, made from the same tiny prune (llama, seed 0,
magnitude scores, no restoration: slicing only, so the weights are bit-identical on any machine);
version 1 carries that version's whole-model fingerprints (runtime.store.fingerprint.model_fingerprint_v1).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from secateur.api import prune
from secateur.lock import LOCK_VERSION, LockError, read_lock
from secateur.testing import save_tiny

LOCKS = Path(__file__).parent / "data" / "locks"
TEXT = "pruning makes models smaller and faster. " * 400  # the locked calibration text


def _lay_out(tmp_path: Path, version: int) -> Path:
    save_tiny(str(tmp_path / "tiny"), "llama", seed=0)
    (tmp_path / "c.txt").write_text(TEXT)
    lock = tmp_path / f"lock-v{version}.yaml"
    shutil.copy(LOCKS / lock.name, lock)
    return lock


@pytest.mark.parametrize("version", [1, 2])
def test_a_lock_of_every_version_reapplies_bit_identically(tmp_path: Path, version: int) -> None:
    lock = _lay_out(tmp_path, version)
    assert read_lock(lock)["lock_version"] == version
    out = prune(lock_path=lock, output=tmp_path / "again", progress=False, log=lambda s: None)
    assert out.reproduced is True
    new = yaml.safe_load((tmp_path / "again" / "recipe.lock.yaml").read_text())
    assert new["lock_version"] == LOCK_VERSION and new["kept"] == read_lock(lock)["kept"]


def test_a_version_1_lock_still_refuses_other_weights(tmp_path: Path) -> None:
    lock = _lay_out(tmp_path, 1)
    save_tiny(str(tmp_path / "tiny"), "llama", seed=1)  # same shapes, other weights
    with pytest.raises(LockError, match="made from another model"):
        prune(lock_path=lock, output=tmp_path / "again", progress=False, log=lambda s: None)
    assert not (tmp_path / "again").exists()


def test_an_unknown_lock_version_is_refused_by_name(tmp_path: Path) -> None:
    data = yaml.safe_load((LOCKS / "lock-v2.yaml").read_text())
    data["lock_version"] = 99
    p = tmp_path / "x.yaml"
    p.write_text(yaml.safe_dump(data))
    with pytest.raises(LockError, match=r"lock_version 1, 2 expected"):
        read_lock(p)
