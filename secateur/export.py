"""`secateur export`: a pruned output folder to GGUF (llama.cpp) or a DeciLM checkpoint (vLLM)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from secateur.graph.adapters import ModelAdapter
from secateur.lock import LOCK_NAME
from secateur.recipe.schema import Recipe
from secateur.runtime.export import FORMATS, ExportError, check_replaceable_path
from secateur.runtime.export.decilm import decilm_config, write_decilm
from secateur.runtime.export.gguf import check_quant_rows, check_tokenizer, gguf_layout, write_gguf
from secateur.runtime.export.gguf_folder import write_gguf_streamed
from secateur.runtime.store.folder import is_pruned_folder
from secateur.runtime.store.loader import ModelSource, load_model, resolve_source
from secateur.runtime.store.outdir import check_location, clean_leftovers, record_files


def source_of(run_dir: Path) -> ModelSource | None:
    """The model a Secateur output was pruned from, as its lock recorded it (None: not recorded)."""
    lock_file = run_dir / LOCK_NAME
    if not lock_file.is_file():
        return None
    try:
        lock = yaml.safe_load(lock_file.read_text()) or {}
        ref = lock["recipe"]["model"]["id"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ExportError(f"{lock_file}: cannot read the source model from it ({e!r})") from e
    return resolve_source(str(ref), lock.get("recipe_dir"))


def tokenizer_gguf_for(source: ModelSource | None, given: str | Path | None, where: str) -> Path:
    """The GGUF whose tokenizer metadata the export carries over: given, or the source model's own."""
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise ExportError(f"--tokenizer-gguf: no such file: {path}")
        return path
    if source is not None and source.gguf_file:
        return Path(source.path) / source.gguf_file
    ref = source.ref if source is not None else "unknown (no recipe.lock.yaml)"
    raise ExportError(
        f"{where}: the source model ({ref}) is not a GGUF file, so there is no llama.cpp tokenizer to carry "
        "over; pass --tokenizer-gguf FILE (recipe: output.export[].tokenizer_gguf), any GGUF of the same "
        "base model, e.g. from llama.cpp's convert_hf_to_gguf.py"
    )


def default_output(run_dir: Path, fmt: str, outtype: str) -> Path:
    """Beside the run folder (a Secateur output lists its files, so nothing is added inside it)."""
    return run_dir.parent / (f"{run_dir.name}-{outtype}.gguf" if fmt == "gguf" else f"{run_dir.name}-decilm")


def export_name(fmt: str, outtype: str) -> str:
    """File or folder name of a recipe export inside the output folder."""
    return f"model-{outtype}.gguf" if fmt == "gguf" else "decilm"


def recipe_tokenizer_gguf(export: Any, source: ModelSource | None, base_dir: Path | None, where: str) -> Path:
    """The GGUF a recipe's gguf export takes its tokenizer from: `tokenizer_gguf` (relative to the
    recipe's folder) or the source model's own GGUF."""
    given = export.tokenizer_gguf
    if given is not None and base_dir is not None and not Path(given).is_absolute():
        given = str(Path(base_dir) / given)
    return tokenizer_gguf_for(source, given, where)


def check_exports(recipe: Recipe, adapter: ModelAdapter, base_dir: Path | None) -> list[str]:
    """What `output.export` will write, checked before any weights load (family, tokenizer source);
    one line per export. Shapes are checked again on the pruned model before anything is written."""
    lines = []
    for i, e in enumerate(recipe.output.export):
        where = f"output.export.{i}"
        if e.format == "gguf":
            if adapter.gguf_arch(False) is None:
                raise ExportError(
                    f"{where}: model_type {adapter.config.model_type!r} has no llama.cpp architecture"
                )
            tok = recipe_tokenizer_gguf(e, resolve_source(recipe.model.id, base_dir), base_dir, where)
            per_layer = adapter.gguf_arch(True)
            arch = adapter.gguf_arch(False) + (
                f", {per_layer} when layers differ" if per_layer else " (uniform only)"
            )
            lines.append(
                f"{where}: gguf {e.outtype} -> {export_name(e.format, e.outtype)} (llama.cpp {arch}; tokenizer from {tok.name})"
            )
        else:
            if not adapter.exports_decilm():
                raise ExportError(
                    f"{where}: vLLM's DeciLM model has the Llama layout only, not {adapter.config.model_type!r}"
                )
            lines.append(
                f"{where}: decilm {e.outtype} -> decilm/ (vLLM DeciLMForCausalLM, --trust-remote-code)"
            )
    return lines


def check_pruned(
    model: nn.Module,
    adapter: ModelAdapter,
    fmt: str,
    tokenizer_gguf: Path | None = None,
    outtype: str | None = None,
    dense_layer: Mapping[str, Any] | None = None,
) -> None:
    """Raise ExportError when the engine cannot hold this pruned model exactly (nothing written);
    `outtype`: also the row lengths a quantised GGUF type needs (judged by `dense_layer`)."""
    if fmt == "gguf":
        gguf_layout(model, adapter)
        if tokenizer_gguf is not None:
            check_tokenizer(model, tokenizer_gguf)
        if outtype is not None:
            check_quant_rows(model, adapter, outtype, dense_layer)
    else:
        decilm_config(model, adapter)


def export_model(
    model: nn.Module,
    adapter: ModelAdapter,
    fmt: str,
    out: Path,
    *,
    outtype: str = "f16",
    tokenizer: Any = None,
    tokenizer_gguf: Path | None = None,
    name: str | None = None,
    overwrite: bool = False,
    dense_layer: Mapping[str, Any] | None = None,
) -> Path:
    """Write one export of an in-memory model (used by `export` and by a recipe's output.export;
    `dense_layer`: the dense model's layer shapes, which quantised row lengths are judged by)."""
    if fmt == "gguf":
        if tokenizer_gguf is None:
            raise ExportError("gguf export needs a GGUF file to take the tokenizer from")
        write_gguf(
            model,
            adapter,
            out,
            tokenizer_gguf,
            outtype,
            name=name,
            overwrite=overwrite,
            dense_layer=dense_layer,
        )
    elif fmt == "decilm":
        write_decilm(model, adapter, out, tokenizer=tokenizer, dtype=outtype, overwrite=overwrite)
    else:
        raise ExportError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    return out


def _read_paths(run: Path, source: ModelSource | None, tok_gguf: Path | None) -> list[Path]:
    """What an export reads besides the run folder: the source model, its tokenizer GGUF and the
    folder of the recipe the run was pruned with (an export must not replace any of them)."""
    paths = [tok_gguf] if tok_gguf is not None else []
    if source is not None and Path(source.path).exists():
        src = Path(source.path)
        paths.append(src / source.gguf_file if source.gguf_file else src)
    lock_file = run / LOCK_NAME
    if lock_file.is_file():
        recipe_dir = (yaml.safe_load(lock_file.read_text()) or {}).get("recipe_dir")
        if recipe_dir and Path(recipe_dir).is_dir():
            paths.append(Path(recipe_dir))
    return paths


def check_export_output(run: Path, out: Path, fmt: str, overwrite: bool, reads: list[Path]) -> None:
    """Before the model loads: the output is neither a source nor inside the run folder, and an
    existing one is replaced only with --overwrite and only when Secateur wrote it."""
    check_location(out, [run, *reads], is_file=fmt == "gguf", inside=[run])
    clean_leftovers(out)
    check_replaceable_path(out, overwrite)


def _dense_layer(run: Path) -> dict[str, Any] | None:
    """The dense model's layer shapes a run's report.json records (None without one)."""
    try:
        return json.loads((run / "report.json").read_text()).get("dense_layer") or None
    except (OSError, ValueError, AttributeError):
        return None


def export(
    run_dir: str | Path,
    fmt: str,
    outtype: str = "f16",
    output: str | Path | None = None,
    tokenizer_gguf: str | Path | None = None,
    overwrite: bool = False,
    stream: bool | None = None,
) -> Path:
    """Export a pruned output folder; everything checkable (the output above all) is checked before
    the model loads. A GGUF file is listed in its folder's `.secateur-files`, so --overwrite may
    replace it later (and only it).

    `stream` (GGUF only): read and write one tensor at a time instead of loading the model whole;
    None streams every pruned folder (a Secateur output: the same file byte for byte, in a fraction
    of the memory) and loads other model folders whole."""

    run = Path(run_dir)
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such folder")
    streamed = _streams(run, fmt, stream)
    out = Path(output) if output is not None else default_output(run, fmt, outtype)
    source = source_of(run)
    tok_gguf = tokenizer_gguf_for(source, tokenizer_gguf, str(run)) if fmt == "gguf" else None
    check_export_output(run, out, fmt, overwrite, _read_paths(run, source, tok_gguf))
    name = f"{run.name} (pruned by Secateur)"
    if streamed:
        write_gguf_streamed(run, out, tok_gguf, outtype, name, overwrite, _dense_layer(run))
    else:
        has_tokenizer = any((run / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
        lm = load_model(str(run), dtype="float32", device="cpu", tokenizer=fmt == "decilm" and has_tokenizer)
        export_model(
            lm.model,
            lm.adapter,
            fmt,
            out,
            outtype=outtype,
            tokenizer=lm.tokenizer,
            tokenizer_gguf=tok_gguf,
            name=name,
            overwrite=overwrite,
            dense_layer=_dense_layer(run),
        )
    if out.is_file():
        record_files([out])
    return out


def _streams(run: Path, fmt: str, stream: bool | None) -> bool:
    """Whether this export reads the folder tensor by tensor (see `export`)."""
    if stream is None:
        return fmt == "gguf" and is_pruned_folder(run)
    if stream and fmt != "gguf":
        raise ExportError(f"--stream: only the gguf format is written tensor by tensor, not {fmt!r}")
    if stream and not is_pruned_folder(run):
        raise ExportError(
            f"--stream: {run} is not a pruned output (no secateur.json); export it without --stream"
        )
    return stream
