"""Layer selectors (`targets.layers`, `protect.layers`) and allocation-table keys, checked without a model."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import BeforeValidator

# ---- layer selectors and table keys ------------------------------------------------------------

_INDEX_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_NUMBER_RANGE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*(?:-\s*(\d+(?:\.\d*)?)\s*)?$")
LAYER_SELECTOR_FORMS = "an index (3), an inclusive range ('3-7'), 'all' or 're:<regex>'"


def _check_layer_selector(value: Any) -> str | int:
    """Validate one `targets.layers` entry; the value is kept as written."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"a layer selector is {LAYER_SELECTOR_FORMS}, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"layer index must be >= 0, got {value}")
        return value
    if value == "all" or value.strip().isdigit():
        return value
    if value.startswith("re:"):
        pattern = value[3:]
        if not pattern:
            raise ValueError("empty regex after 're:'")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"invalid regex {pattern!r}: {e}") from None
        return value
    m = _INDEX_RANGE.match(value)
    if m is None:
        raise ValueError(f"a layer selector is {LAYER_SELECTOR_FORMS}, got {value!r}")
    lo, hi = int(m[1]), int(m[2])
    if lo > hi:
        raise ValueError(f"empty layer range {value!r}: {lo} > {hi} (ranges are 'lo-hi', inclusive)")
    return value


LayerSelector = Annotated[str | int, BeforeValidator(_check_layer_selector)]


def select_layers(selectors: Sequence[str | int], num_layers: int, prefix: str = "model.layers") -> list[int]:
    """Layer indices chosen by `targets.layers`, sorted; regexes must match a whole name `{prefix}.{i}`."""
    chosen: set[int] = set()
    for sel in selectors:
        if isinstance(sel, str) and sel.startswith("re:"):
            rx = re.compile(sel[3:])
            chosen.update(i for i in range(num_layers) if rx.fullmatch(f"{prefix}.{i}"))
            continue
        if sel == "all":
            chosen.update(range(num_layers))
            continue
        if isinstance(sel, int) or sel.strip().isdigit():
            lo = hi = int(sel)
        else:
            m = _INDEX_RANGE.match(sel)
            if m is None:
                raise ValueError(f"not a layer selector: {sel!r}")
            lo, hi = int(m[1]), int(m[2])
        if hi >= num_layers:
            raise ValueError(f"layer selector {sel!r} is out of range for a model with {num_layers} layers")
        chosen.update(range(lo, hi + 1))
    return sorted(chosen)


class TableKey(NamedTuple):
    """A parsed `allocation.table` key: layer indices or depth fractions, both inclusive."""

    kind: Literal["layers", "depth"]
    lo: float
    hi: float


def parse_table_key(key: str) -> TableKey:
    """'12' and '0-5' are layer indices; '0.5' and '0.25-0.5' (with a dot) are depth fractions in [0, 1]."""
    m = _NUMBER_RANGE.match(key)
    if m is None:
        raise ValueError(
            f"table key {key!r} is not a layer index ('12'), a range ('0-5') or a depth fraction ('0.5', '0.25-0.5')"
        )
    lo_s, hi_s = m[1], m[2] if m[2] is not None else m[1]
    if "." in lo_s or "." in hi_s:
        lo, hi = float(lo_s), float(hi_s)
        if not (0.0 <= lo <= 1.0 and 0.0 <= hi <= 1.0):
            raise ValueError(f"depth fraction {key!r} must lie in [0, 1]")
        kind: Literal["layers", "depth"] = "depth"
    else:
        lo, hi = int(lo_s), int(hi_s)
        kind = "layers"
    if lo > hi:
        raise ValueError(f"empty range {key!r}: {lo_s} > {hi_s}")
    return TableKey(kind, lo, hi)
