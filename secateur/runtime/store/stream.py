"""The streaming runtime: a model whose decoder layers are read from disk one at a time.

The model is a skeleton (meta tensors) with only the embeddings, final norm and head resident.
The sequential pass asks for layer i (`load_layer`), prunes and runs it, then the layer is
written to its own safetensors shard and dropped (`release_layer`). Perplexity streams the same
way: every window's hidden states go through the layers one layer at a time, and the head runs
last. Peak memory is then about two copies of one layer (the dense one being pruned and the
sliced result) plus embeddings, head and the calibration activations, whatever the depth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from secateur.graph.adapters import ModelAdapter, adapter_for
from secateur.runtime.measure.evaluate import window_nll
from secateur.runtime.prune.capture import capture_inputs, run_layer
from secateur.runtime.store.deliver import check_finite_source, check_finite_tensors
from secateur.runtime.store.fingerprint import Fingerprint, saved_tensor
from secateur.runtime.store.folder import is_pruned_folder
from secateur.runtime.store.formats import INDEX_NAME, LoadedModel, ModelLoadError, ModelSource
from secateur.runtime.store.io import DEFAULT_MAX_SHARD_SIZE, branch_markers, pruned_skeleton, write_error
from secateur.runtime.store.weights import (
    GGUFSource,
    SafetensorsSource,
    WeightSource,
    WeightSourceError,
    check_complete,
)

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Serve allocations over `threshold` bytes with mmap, so a freed layer's buffers go back to the
    system. glibc's default raises its mmap threshold up to 32 MiB after the first large free, and a
    layer's tensors then come from a heap that fragments: a streamed 1.1B prune grew 0.9 GiB over 16
    layers that way, and peaked 0.7 GiB lower with this. False where the C library is not glibc."""
    try:
        libc = _libc()
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, threshold)
        )
    except AttributeError:  # no libc found, or one without mallopt
        return False


def trim_freed_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc malloc_trim, every arena), so what a
    released layer's small allocations leave free in the worker threads' arenas is not carried into
    the next layer's peak. False where the C library is not glibc."""
    try:
        return bool(_libc().malloc_trim(0))
    except AttributeError:
        return False


class StreamedModel:
    """A skeleton model plus a weight source; decoder layers are materialised on request."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        source: WeightSource,
        dtype: torch.dtype,
        device: torch.device,
        where: str,
    ) -> None:
        self.model, self.adapter, self.source = model, adapter, source
        self.dtype, self.device, self.where = dtype, device, where
        return_freed_memory()  # one layer resident must mean one layer's memory held
        self.dense_fingerprint = Fingerprint()  # of the tensors as read by the prune pass
        self.tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
        names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        check_complete(source, names, self.tied, where)
        self._load_resident()

    def _layer_prefix(self, i: int) -> str:
        return self.adapter.layer_prefix(i) + "."

    def _assign(self, name: str, t: torch.Tensor) -> None:
        mod_name, pname = name.rsplit(".", 1)
        mod = self.model.get_submodule(mod_name)
        mod._parameters[pname] = nn.Parameter(t.to(device=self.device, dtype=self.dtype))

    def _load_resident(self) -> None:
        """Embeddings, final norm, head: everything outside the decoder layers (tied head last).

        A tensor the source maps from its file already in the working dtype stays a view of the
        file (`mapped`): only the pages read count in resident memory, and the decoder pass reads
        only the calibration tokens' embedding rows. Hashing reads every page, so each such tensor
        is mapped afresh once hashed (7B shapes: 2 GiB of embeddings and head out of the peak)."""
        layers_path = self.adapter.layers_path + "."
        self.mapped: set[str] = set()
        for name, _ in list(self.model.named_parameters(remove_duplicate=False)):
            if not name.startswith(layers_path) and name not in self.tied:
                t = self.source.get(name)
                self._assign(name, t)
                if self.source.mapped and self.model.get_parameter(name).data_ptr() == t.data_ptr():
                    self.mapped.add(name)
        if self.tied:
            self.model.tie_weights()
        state = self.resident_state()
        for name in list(state):
            self.dense_fingerprint.add(name, state.pop(name))
            self._remap(name)
        if self.tied:
            self.model.tie_weights()
        self._resident_fp = self.dense_fingerprint.copy()
        self._source_fp: str | None = None

    def _remap(self, name: str) -> None:
        """Map a `mapped` tensor from its file again: the pages read so far leave resident memory
        with the old mapping (the same bytes, nothing written to a mapped tensor before this)."""
        if name in self.mapped:
            self._assign(name, self.source.get(name))

    def unmap_resident(self) -> None:
        """Drop the pages of the file-mapped resident tensors read so far (the load's finite check
        and the dense perplexity read them whole), so that the decoder pass starts without them."""
        for name in sorted(self.mapped):
            self._remap(name)
        if self.tied:
            self.model.tie_weights()

    def resident_state(self) -> dict[str, torch.Tensor]:
        """State outside the decoder layers, tied aliases once (the model's state_dict order)."""
        layers_path = self.adapter.layers_path + "."
        seen: set[int] = set()
        out = {}
        for k, v in self.model.state_dict().items():
            if k.startswith(layers_path) or (v.data_ptr() in seen and v.numel()):
                continue
            seen.add(v.data_ptr())
            out[k] = v.detach().to("cpu").contiguous()
        return out

    def round_resident(self, dtype: torch.dtype) -> None:
        """Round the resident weights to `dtype` in place (working dtype kept), as the in-memory
        path rounds the whole model to the output dtype before evaluating it (written in place: the
        tensors are no longer the file's, `unmap_resident` must not map them again)."""
        self.mapped = set()
        with torch.no_grad():
            for t in self.model.state_dict().values():
                if t.device.type != "meta" and t.is_floating_point() and t.dtype != dtype:
                    t.copy_(t.to(dtype).to(t.dtype))

    def load_layer(self, i: int, record: bool = False) -> None:
        """Read layer i's weights from the source (`record`: into the dense fingerprint)."""
        trim_freed_memory()  # what the phases before this layer left free (loading, calibration)
        prefix = self._layer_prefix(i)
        layer = self.adapter.layers(self.model)[i]
        for name, _ in list(layer.named_parameters()):
            t = self.source.get(prefix + name)
            if record:
                self.dense_fingerprint.add(prefix + name, t.to(self.dtype))
            self._assign(prefix + name, t)

    def source_fingerprint(self) -> str:
        """The dense weights' fingerprint (`model_fingerprint` of the model loaded whole), the layers
        read from the source one tensor at a time (what the variant database is keyed by)."""
        if self._source_fp is None:
            fp = self._resident_fp.copy()
            for i, layer in enumerate(self.adapter.layers(self.model)):
                prefix = self._layer_prefix(i)
                for name, _ in layer.named_parameters():
                    fp.add(prefix + name, self.source.get(prefix + name).to(self.dtype))
            self._source_fp = fp.hexdigest()
        return self._source_fp

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's current tensors under their full names, contiguous on the CPU."""
        layer = self.adapter.layers(self.model)[i]
        return {
            k: v.detach().to("cpu").contiguous()
            for k, v in layer.state_dict(prefix=self._layer_prefix(i)).items()
        }

    def release_layer(self, i: int) -> None:
        """Drop layer i's weights, keeping their (possibly pruned) shapes on the meta device."""
        layer = self.adapter.layers(self.model)[i]
        for mod in layer.modules():
            for pname, p in list(mod._parameters.items()):
                if p is not None:
                    mod._parameters[pname] = nn.Parameter(
                        torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False
                    )
        trim_freed_memory()


class ShardWriter:
    """Writes a model as numbered safetensors shards plus HF's index, layer by layer.

    Each `write` (one decoder layer, or the resident tensors) is cast to the output dtype and split
    into shards of at most `max_shard_size` with huggingface_hub's splitter, as `save_pretrained`
    splits a whole model; shards never span two writes, so nothing is buffered beyond one layer.
    The total count is known only at `finish`, which renames the shards to HF's
    `model-0000k-of-0000n.safetensors` and writes `model.safetensors.index.json` in HF's format."""

    def __init__(
        self,
        folder: Path,
        dtype: torch.dtype | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    ) -> None:
        self.folder, self.dtype, self.max_shard_size = Path(folder), dtype, max_shard_size
        self.files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self.fingerprint = Fingerprint()

    @property
    def n(self) -> int:
        """Shards written so far."""
        return len(self.files)

    def write(self, tensors: dict[str, torch.Tensor], markers: dict[str, torch.Tensor] | None = None) -> None:
        """Write tensors (and `io.branch_markers`, which are no weights and stay out of the fingerprint)."""
        from huggingface_hub import split_torch_state_dict_into_shards

        markers = markers or {}
        tensors = {k: saved_tensor(v, self.dtype) for k, v in {**tensors, **markers}.items()}
        check_finite_tensors(tensors.items(), self.dtype or torch.float32)
        split = split_torch_state_dict_into_shards(tensors, max_shard_size=self.max_shard_size)
        for names in split.filename_to_tensors.values():
            name = f"part-{len(self.files) + 1:05d}.safetensors.partial"
            try:
                save_file({k: tensors[k] for k in names}, str(self.folder / name), metadata={"format": "pt"})
            except Exception as e:  # a full disk: safetensors' own error type
                raise write_error(self.folder, e) from e
            self.files.append(name)
            for key in names:
                self.weight_map[key] = name
                self.total += tensors[key].numel() * tensors[key].element_size()
                if key not in markers:
                    self.fingerprint.add(key, tensors[key])

    def finish(self) -> None:
        """Give the shards their final names and write the index."""
        final = {}
        for k, name in enumerate(self.files, 1):
            final[name] = f"model-{k:05d}-of-{self.n:05d}.safetensors"
            (self.folder / name).rename(self.folder / final[name])
        self.weight_map = {key: final[f] for key, f in self.weight_map.items()}
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


class StreamPass:
    """The sequential pass's layer hooks: read layer i before it runs, write and drop it after."""

    def __init__(self, streamed: StreamedModel, writer: ShardWriter) -> None:
        self.streamed, self.writer = streamed, writer

    def load(self, i: int) -> None:
        self.streamed.load_layer(i, record=True)
        check_finite_source(self.streamed.layer_state(i).items(), f"layer {i} of the source")

    def done(self, i: int) -> None:
        s = self.streamed
        self.writer.write(s.layer_state(i), branch_markers(s.model, s.adapter, [i], self.writer.dtype))
        self.streamed.release_layer(i)

    def dense(self) -> DenseRead:
        return DenseRead(self.streamed)

    def weights_fingerprint(self) -> str:
        return self.streamed.source_fingerprint()


class DenseRead:
    """The first of two streamed passes (whole-model allocations): each dense layer is read,
    measured and dropped; nothing is written or fingerprinted (the pruning pass reads them again)."""

    def __init__(self, streamed: StreamedModel) -> None:
        self.streamed = streamed

    def load(self, i: int) -> None:
        self.streamed.load_layer(i)
        check_finite_source(self.streamed.layer_state(i).items(), f"layer {i} of the source")

    def done(self, i: int) -> None:
        self.streamed.release_layer(i)

    def dense(self) -> DenseRead:
        return self

    def weights_fingerprint(self) -> str:
        return self.streamed.source_fingerprint()


class _Replay(nn.Module):
    """Stands in for a decoder layer: returns precomputed outputs (or passes hidden states on)."""

    def __init__(self, outputs: list[torch.Tensor] | None) -> None:
        super().__init__()
        self.outputs = outputs
        self.calls = 0

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.outputs is None:
            return hidden_states
        out = self.outputs[self.calls]
        self.calls += 1
        return out


def stream_window_nll(streamed: StreamedModel, windows: torch.Tensor, progress: bool | str = False) -> float:
    """window_nll (batch size 1) with the decoder layers read one at a time from the source."""
    model, adapter = streamed.model, streamed.adapter
    inputs = capture_inputs(model, adapter, windows, batch_size=1)
    hidden = inputs.hidden
    layers = adapter.layers(model)
    steps = range(len(layers))
    if progress:
        steps = tqdm(steps, desc=f"{progress if isinstance(progress, str) else 'perplexity'} (streamed)")
    for i in steps:
        streamed.load_layer(i)
        hidden = run_layer(layers[i], hidden, inputs.kwargs[i])
        streamed.release_layer(i)
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _Replay(hidden if i == 0 else None)
    try:
        return window_nll(model, windows, batch_size=1)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


# what the formula leaves to the process itself: Python, torch, transformers and the tokenizer
# (0.5-0.9 GiB measured beside SmolLM2 and 7B-shaped layers, bench/results/scale.md)
RUNTIME_ALLOWANCE = 2**30


def memory_bound(
    model: nn.Module,
    adapter: ModelAdapter,
    dtype: torch.dtype,
    calib_tokens: int,
    dense_stream: bool = False,
    mapped: Collection[str] = (),
) -> dict[str, int]:
    """The streaming prune's resident bytes, term by term (the formula the benchmark checks):

    2 x largest layer (the dense layer and its pruned slices) + embeddings, norm and head as the
    decoder pass holds them + calibration activations (the layer's inputs and outputs, twice with
    error correction) + consumer statistics (fp32 Gram matrices of o_proj and down_proj; the
    restoration builds and factors the kept columns' Gram inside the consumer's own) + the
    restoration's workspace (the kept weight slice, the right-hand side and two triangular solves,
    each at most rows x width in fp32, for the widest consumer) + what writing and perplexity add
    after the pass (`after_pass`) + a fixed runtime allowance (`RUNTIME_ALLOWANCE`). Error correction
    (`dense_stream`) also holds the cross products X_ref^T X and a separate kept-column Gram.

    `mapped` names the resident tensors read in place from the source file (`StreamedModel.mapped`):
    the decoder pass reads only the calibration tokens' rows of them; writing the output and the
    perplexity read them whole, but with only one layer and no statistics resident, so they add
    only what that exceeds the pass by.
    """
    size = torch.empty((), dtype=dtype).element_size()
    layers = adapter.layers(model)
    layer = max(sum(p.numel() for p in layer.parameters()) for layer in layers) * size
    layer_ids = {id(p) for p in layers.parameters()}
    params = dict(model.named_parameters())  # tied aliases once
    resident = [(n, p) for n, p in params.items() if id(p) not in layer_ids]
    whole = sum(p.numel() for _, p in resident) * size
    held = sum(min(p.numel(), calib_tokens * p.shape[-1]) if n in mapped else p.numel() for n, p in resident)
    acts = calib_tokens * adapter.hidden_size * size * 2 * (2 if dense_stream else 1)
    widths = (adapter.intermediate_size, adapter.num_heads * adapter.head_dim)
    terms = {
        "layer_x2": 2 * layer,
        "resident": held * size,
        "activations": acts,
        "statistics": 4 * sum(w**2 for w in widths) * (2 if dense_stream else 1),
        "solve": 4 * 4 * adapter.hidden_size * max(widths) + (4 * max(widths) ** 2 if dense_stream else 0),
    }
    terms["after_pass"] = max(0, layer + whole - sum(terms.values()))
    terms["runtime"] = RUNTIME_ALLOWANCE
    return {**terms, "total": sum(terms.values())}


def mapped_resident(
    folder: str | Path, model: nn.Module, adapter: ModelAdapter, dtype: torch.dtype
) -> set[str]:
    """The resident tensors a streamed model on the CPU would read in place from `folder`
    (`StreamedModel.mapped`, known before loading: those its safetensors store in `dtype`), for
    `memory_bound` in `recipe explain`; empty for a GGUF file or a folder not on disk."""
    if not Path(folder).is_dir():
        return set()
    try:
        source = SafetensorsSource(folder)
    except WeightSourceError:
        return set()
    layers_path = adapter.layers_path + "."
    names = [n for n, _ in model.named_parameters() if not n.startswith(layers_path) and n in source.names()]
    return {n for n in names if source.stored_dtype(n) == dtype}


def stream_perplexity(streamed: StreamedModel, windows: torch.Tensor, progress: bool | str = False) -> float:
    """exp of stream_window_nll: the same figure `evaluate.perplexity` gives in memory."""
    return math.exp(stream_window_nll(streamed, windows, progress))


def streamed_model(src: ModelSource, dev: torch.device, dt: torch.dtype, config: Any) -> LoadedModel:
    """A streamed model (loader.load_model(..., stream=True)): skeleton + resident embeddings/head,
    layers left on disk."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    folder = Path(src.path)
    if not folder.is_dir():
        raise ModelLoadError(
            f"model.stream: {src.ref!r} is not a local folder or GGUF file; streaming reads local weights "
            f"(download the model first)"
        )
    if is_pruned_folder(folder):
        model = pruned_skeleton(folder)
    else:
        config.__dict__.pop("quantization_config", None)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config)
    model.config.dtype = dt
    if (folder / "generation_config.json").is_file():  # what from_pretrained would read
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    model.tie_weights()
    model.eval()
    where = str(folder / src.gguf_file) if src.gguf_file else str(folder)
    source = GGUFSource(folder / src.gguf_file, model) if src.gguf_file else SafetensorsSource(folder)
    lm = LoadedModel(model, adapter_for(model.config), None, src, dev, dt)
    lm.stream = StreamedModel(model, lm.adapter, source, dt, dev, where)
    return lm
