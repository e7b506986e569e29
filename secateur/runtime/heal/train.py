"""Distillation on Hugging Face Trainer: its optimiser, schedule, gradient accumulation, bf16
autocast, gradient checkpointing, checkpoints and resume, and (through accelerate) the same code
on one GPU or many. Secateur adds only the loss and the choice of what trains.

Resume: checkpoints go to a work folder keyed by everything that decides the result (the pruned
weights before healing, the heal settings, the data); running the same command after a kill
finds the last checkpoint there and continues from it (Trainer restores weights, optimiser,
schedule, RNG and data position), so the result equals an uninterrupted run on the same device.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint
from transformers.utils import logging as hf_logging

from secateur.recipe.heal import Heal
from secateur.runtime.heal.loss import topk_kl
from secateur.runtime.heal.teacher import TeacherTargets

HEAL_DIR_ENV = "SECATEUR_HEAL_DIR"


def work_root() -> Path:
    """Where heal checkpoints live until the run that made them has saved its output."""
    root = os.environ.get(HEAL_DIR_ENV)
    return Path(root) if root else Path.home() / ".cache" / "secateur" / "heal"


def fast_bf16(device: torch.device) -> bool:
    """bf16 autocast pays where the hardware runs bf16 matmuls natively (CUDA with bf16, or a CPU
    with AMX / AVX512-BF16); elsewhere it is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


class _Distillation(Dataset):
    """Training windows with their teacher targets, as Trainer batches them."""

    def __init__(self, windows: torch.Tensor, targets: TeacherTargets) -> None:
        self.windows, self.t = windows, targets

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.windows[i],
            "idx": self.t.idx[i],
            "logp": self.t.logp[i],
            "rest": self.t.rest[i],
        }


class _DistilTrainer(Trainer):
    """Trainer whose loss is the top-k KL to the cached teacher (no labels)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = False  # our loss is a mean per micro-batch: Trainer divides it

    def compute_loss(
        self, model: nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch: Any = None
    ):  # noqa: ANN201
        out = model(input_ids=inputs["input_ids"], use_cache=False)
        loss = topk_kl(out.logits, inputs["idx"], inputs["logp"], inputs["rest"])
        return (loss, out) if return_outputs else loss


class _Progress(TrainerCallback):
    """One line per logging step: loss, tokens/s, time left (Trainer's own bar also runs)."""

    def __init__(self, tokens_per_step: int, log: Callable[[str], None]) -> None:
        self.tokens_per_step, self.log, self.t0, self.step0 = tokens_per_step, log, 0.0, 0
        self.losses: list[tuple[int, float]] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.t0, self.step0 = time.perf_counter(), state.global_step

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
        if not logs or "loss" not in logs:
            return
        self.losses.append((state.global_step, float(logs["loss"])))
        done = state.global_step - self.step0
        dt = time.perf_counter() - self.t0
        tps = done * self.tokens_per_step / dt if dt > 0 else 0.0
        left = (state.max_steps - state.global_step) * dt / done if done else math.nan
        self.log(
            f"heal step {state.global_step}/{state.max_steps}: KL {logs['loss']:.4f}, "
            f"{tps:,.0f} tokens/s, {left / 60:.1f} min left"
        )


@dataclass
class HealResult:
    """What one healing run did, for the report and the lock."""

    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    precision: str
    trainable_params: int
    resumed_from: int | None
    loss: list[tuple[int, float]] = field(default_factory=list)
    work_dir: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def choose_trainable(model: nn.Module, heal: Heal, pruned_layers: set[int], layers: nn.ModuleList) -> None:
    """Set requires_grad by `heal.train` and `freeze_embeddings` (LoRA: none here, peft adds its own)."""
    for p in model.parameters():
        p.requires_grad_(heal.train == "all")
    if heal.train == "pruned":
        for i in sorted(pruned_layers):
            for p in layers[i].parameters():
                p.requires_grad_(True)
    if heal.freeze_embeddings:
        for m in (model.get_input_embeddings(), model.get_output_embeddings()):
            if m is not None:
                for p in m.parameters():
                    p.requires_grad_(False)


def lora_model(model: nn.Module, heal: Heal, layers: nn.ModuleList) -> nn.Module:
    """Wrap every non-empty linear of the decoder layers in a LoRA adapter (peft)."""
    from peft import LoraConfig, get_peft_model  # optional dependency: only LoRA healing needs it

    prefix = next(n for n, m in model.named_modules() if m is layers)
    names = [
        f"{prefix}.{n}"
        for n, m in layers.named_modules()
        if isinstance(m, nn.Linear) and m.in_features > 0 and m.out_features > 0
    ]
    cfg = LoraConfig(
        r=heal.lora.r, lora_alpha=heal.lora.alpha, lora_dropout=heal.lora.dropout, target_modules=names
    )
    return get_peft_model(model, cfg)


def training_args(
    heal: Heal, work: Path, device: torch.device, bf16: bool, progress: bool
) -> TrainingArguments:
    """Trainer's settings from the recipe: one epoch over new text, checkpoints every N steps."""
    return TrainingArguments(
        output_dir=str(work),
        max_steps=heal.steps,
        per_device_train_batch_size=heal.micro_batch,
        gradient_accumulation_steps=heal.batch // heal.micro_batch,
        learning_rate=heal.lr,
        lr_scheduler_type=heal.schedule,
        warmup_steps=round(heal.warmup * heal.steps),
        weight_decay=heal.weight_decay,
        bf16=bf16,
        use_cpu=device.type == "cpu",
        activation_checkpointing=heal.gradient_checkpointing,
        save_strategy="steps",
        save_steps=heal.checkpoint_every,
        save_total_limit=1,
        logging_steps=max(1, min(10, heal.steps // 20)),
        seed=heal.seed,
        data_seed=heal.seed,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not progress,
        save_only_model=False,
    )


def run_trainer(
    model: nn.Module,
    heal: Heal,
    windows: torch.Tensor,
    targets: TeacherTargets,
    work: Path,
    pruned_layers: set[int],
    layers: nn.ModuleList,
    log: Callable[[str], None],
    progress: bool = True,
) -> HealResult:
    """Train the pruned model in place toward the teacher; float32 master weights, autocast by
    `heal.precision`. The model is left in its original dtype, in eval mode."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    bf16 = heal.precision == "bfloat16" or (heal.precision == "auto" and fast_bf16(device))
    model.float()
    choose_trainable(model, heal, pruned_layers, layers)
    student = lora_model(model, heal, layers) if heal.train == "lora" else model
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    work.mkdir(parents=True, exist_ok=True)
    last = last_complete_checkpoint(work)
    resumed = int(last.rsplit("-", 1)[1]) if last else None
    if last:
        log(f"heal: resuming from {last} (step {resumed} of {heal.steps})")
    cb = _Progress(heal.batch * heal.seqlen, log)
    trainer = _DistilTrainer(
        model=student,
        args=training_args(heal, work, device, bf16, progress),
        train_dataset=_Distillation(windows[: heal.sequences], targets),
        callbacks=[cb],
    )
    for noisy in (PrinterCallback, ProgressCallback):  # they print raw log dicts; `cb` prints lines
        trainer.remove_callback(noisy)
    t0 = time.perf_counter()
    with _quiet_transformers():
        trainer.train(resume_from_checkpoint=last)
    seconds = time.perf_counter() - t0
    if heal.train == "lora":
        student.merge_and_unload()
    for p in model.parameters():
        p.requires_grad_(False)
    model.to(dtype).eval()
    done = heal.steps - (resumed or 0)
    return HealResult(
        steps=heal.steps,
        tokens=heal.steps * heal.batch * heal.seqlen,
        seconds=seconds,
        tokens_per_s=done * heal.batch * heal.seqlen / seconds if seconds > 0 else 0.0,
        precision="bfloat16 autocast" if bf16 else "float32",
        trainable_params=trainable,
        resumed_from=resumed,
        loss=_losses(trainer),
        work_dir=str(work),
    )


def last_complete_checkpoint(work: Path) -> str | None:
    """The newest checkpoint Trainer finished writing. Trainer writes a checkpoint in place, its
    trainer_state.json last, and drops the older one only after that; a kill during the save leaves
    a partial folder, which is removed here (the work folder is ours) so the previous one is used."""
    while (last := get_last_checkpoint(str(work))) is not None:
        try:
            json.loads((Path(last) / "trainer_state.json").read_text())
            return last
        except (OSError, ValueError):
            shutil.rmtree(last)
    return None


def _losses(trainer: Trainer) -> list[tuple[int, float]]:
    """(step, loss) of every logging step, including those before a resume."""
    return [(int(h["step"]), float(h["loss"])) for h in trainer.state.log_history if "loss" in h]


class _quiet_transformers:
    """Trainer warns about things a distillation run does on purpose (no labels, checkpoint
    shards, mtime fallbacks); keep the user's output to our progress lines."""

    def __enter__(self) -> None:
        self.level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()

    def __exit__(self, *exc: object) -> None:
        hf_logging.set_verbosity(self.level)
        hf_logging.enable_progress_bar()
