"""On-disk cache of timings, keyed by everything that changes them: the machine (CPU model, core
count), the engine and its version, device, dtype or GGUF type, threads, and the shapes timed.
A second run with the same key measures nothing; any change measures again."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

from secateur.runtime.speed.engines import default_threads
from secateur.runtime.store.atomic import atomic_write_text


def cache_dir() -> Path:
    """SECATEUR_CACHE_DIR, else ~/.cache/secateur/speed."""
    root = os.environ.get("SECATEUR_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "secateur" / "speed"


def machine() -> dict[str, Any]:
    """What identifies this machine's speed: CPU model name and the cores this process may use."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "cores": default_threads()}


def cache_key(kind: str, **fields: Any) -> str:
    """A stable digest of `fields` (JSON, sorted keys) under a readable kind prefix."""
    blob = json.dumps({"kind": kind, "machine": machine(), **fields}, sort_keys=True, default=str)
    return f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:20]}"


def load(key: str) -> dict[str, Any] | None:
    """A cached record, or None when absent or unreadable (it is then measured again)."""
    p = cache_dir() / f"{key}.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def store(key: str, record: dict[str, Any]) -> None:
    """Write a record atomically (a concurrent reader sees the old file or the new one)."""
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / f"{key}.json", json.dumps(record, indent=1, sort_keys=True))
