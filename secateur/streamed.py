"""`prune` with `model.stream: true`: layers read one at a time, the output written shard by shard.

Only the embeddings, final norm and head stay in memory; each decoder layer is read from the
source, pruned, run on the calibration activations and written to its own shard of the (atomic)
output folder before the next one is read. Perplexity before and after streams the same way.
Methods and options that need the whole model at once refuse before anything loads.
`StreamedPipeline` overrides only the phases of `secateur.pipeline.Pipeline` that streaming changes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

from secateur.evaluation import evaluate_ppl
from secateur.export import export_name, recipe_tokenizer_gguf
from secateur.lock import LockError, check_kept_ranges
from secateur.pipeline import Pipeline, PruneRun
from secateur.results import check_lock_model, check_lock_result, kept_units, write_run_files
from secateur.runtime.export import ExportError
from secateur.runtime.export.gguf_folder import write_gguf_streamed
from secateur.runtime.store.deliver import check_perplexity
from secateur.runtime.store.io import all_layer_shapes, write_metadata
from secateur.runtime.store.outdir import atomic_dir
from secateur.runtime.store.stream import ShardWriter, StreamPass, memory_bound
from secateur.runtime.store.weights import SafetensorsSource


class StreamedPipeline(Pipeline):
    """The streaming counterpart of `Pipeline`: same checks, same report and lock, sharded output."""

    stream = True

    def __init__(self) -> None:
        self.tmp: Path | None = None  # the atomic output folder while it is being written
        self.writer: ShardWriter | None = None
        self.bound = 0  # bytes the dense layers' streaming needs at most
        self.refused: list[str] = []  # output.export entries the engine cannot hold

    def preflight(self, run: PruneRun) -> None:
        if run.lock_data is not None and run.lock_data.get("lock_version") == 1:
            raise LockError(
                f"{run.lock_path}: lock_version 1 fingerprints hash the whole model in one pass, which streaming "
                "cannot compute layer by layer; re-apply it without --stream / model.stream (the output then "
                "carries a version 2 lock that streams)"
            )
        super().preflight(run)

    def check_lock_model(self, run: PruneRun) -> None:
        """Only the lock's indices now: the dense fingerprint accumulates as the layers are read."""
        if run.lock_data is not None:
            shapes = all_layer_shapes(run.lm.model, run.lm.adapter)
            check_kept_ranges(run.lock_data["kept"], shapes, run.lock_path)

    @contextlib.contextmanager
    def output(self, run: PruneRun) -> Iterator[None]:
        """The atomic output folder, which each pruned layer is written into as its shard."""
        with atomic_dir(run.out, run.overwrite) as tmp:
            self.tmp = tmp
            self.writer = ShardWriter(tmp, run.out_dtype, run.recipe.output.max_shard_size)
            run.layer_io = StreamPass(run.lm.stream, self.writer)
            yield
        if self.refused:  # the pruned model is saved; the exports left out are reported after
            raise ExportError(f"pruned model saved to {run.out}, but " + "; ".join(self.refused))

    def fingerprint(self, run: PruneRun) -> None:
        """The shards hold the weights in the output dtype; the fingerprints come from reading and
        writing them."""
        lm = run.lm
        self.writer.write(lm.stream.resident_state())
        self.writer.finish()
        run.dense_fp = lm.stream.dense_fingerprint.hexdigest()
        if run.lock_data is not None:
            check_lock_model(run.lock_data, run.lock_path, run.dense_fp)
        run.kept = kept_units(run.results)
        run.pruned_fp = self.writer.fingerprint.hexdigest()
        run.reproduced = check_lock_result(run.lock_data, run.lock_path, run.kept, run.pruned_fp)

    def evaluate_dense(self, run: PruneRun) -> None:
        """The memory bound of the dense layers first, then dense sizes and perplexity; the pages of
        the file-mapped embeddings and head that perplexity read are dropped before the decoder pass."""
        c = run.recipe.calibration
        ec = run.plan.stages[0].restore.error_correction > 0
        lm = run.lm
        tokens = c.n_samples * c.seqlen
        self.bound = memory_bound(lm.model, lm.adapter, lm.dtype, tokens, ec, lm.stream.mapped)
        super().evaluate_dense(run)
        lm.stream.unmap_resident()

    def report(self, run: PruneRun) -> None:
        super().report(run)
        run.report["stream"] = {
            "shards": self.writer.n,
            "dense_eval_s": run.dense_eval_s,
            "memory_bound_bytes": self.bound,
        }

    def evaluate(self, run: PruneRun) -> None:
        """Perplexity of the pruned model as saved: the shards just written, resident weights rounded."""
        if not run.recipe.evaluate.enabled:
            return
        t = time.perf_counter()
        run.lm.stream.round_resident(run.out_dtype)
        run.lm.stream.source = SafetensorsSource(self.tmp)  # the pruned layers, as just written
        label = "pruned" if run.progress else False
        pruned = evaluate_ppl(run.recipe, run.lm, run.base_dir, run.ppl_cache, label)
        run.report["perplexity"] = {"dense": run.dense_ppl, "pruned": pruned}
        check_perplexity(run.report["perplexity"])
        run.report["stream"]["pruned_eval_s"] = time.perf_counter() - t

    def write(self, run: PruneRun) -> None:
        """Config, tokenizer, card, recipe, lock and report beside the shards."""
        lm = run.lm
        plain = write_metadata(lm.model, lm.adapter, self.tmp, lm.tokenizer, run.out_dtype)
        write_run_files(self.tmp, run.out, lm, run.recipe, run.lock, run.report, plain)
        self.export(run)

    def export(self, run: PruneRun) -> None:
        """The recipe's GGUF exports (checked at preflight: no DeciLM when streaming), each written
        from the shards just saved, one tensor at a time; one the engine cannot hold is left out."""
        for i, e in enumerate(run.recipe.output.export):
            where = f"output.export.{i}"
            try:
                tok = recipe_tokenizer_gguf(e, run.lm.source, run.base_dir, where)
                write_gguf_streamed(
                    self.tmp,
                    self.tmp / export_name(e.format, e.outtype),
                    tok,
                    e.outtype,
                    name=f"{run.recipe.name or run.out.name} (pruned by Secateur)",
                    dense_layer=run.report.get("dense_layer"),
                )
            except ExportError as err:
                self.refused.append(f"{where} ({e.format}): {err}")
