"""Training loop (pre-training and fine-tuning) and the check that planted facts were learned.

Training loss: causal-LM cross-entropy averaged over the batch's labelled tokens (response tokens
and EOS by default; see tdabench.models), optionally with label smoothing, which keeps a small
model from becoming infinitely sure of memorised text (attribution always uses the plain loss).
AdamW, linear warm-up, cosine decay, seeded shuffling: the same config and seed give the same
weights on the same machine. Batches go to the model's device; `precision: bfloat16` runs the
forward pass under bf16 autocast (weights and optimiser state stay fp32).
"""

from __future__ import annotations

import contextlib
import math
import re

import torch
import torch.nn.functional as F

from tdabench.data.sources import DataError
from tdabench.device import DeviceError, halving, supports_bf16
from tdabench.errors import StudyError
from tdabench.models import Encoded, collate, encode_prompt, unlabelled
from tdabench.progress import Progress
from tdabench.sections import TrainConfig


def lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def precision_context(device: torch.device, precision: str):
    """Autocast for `precision` on `device` (bf16 only where the hardware has it)."""
    if precision == "float32":
        return contextlib.nullcontext()
    if precision != "bfloat16":
        raise ValueError(f"training precision {precision!r}: allowed float32, bfloat16")
    if device.type == "cuda" and not supports_bf16(device):
        raise DeviceError(f"precision bfloat16: {device} does not support bf16; use precision: float32")
    return torch.autocast(device.type, dtype=torch.bfloat16)


def lm_loss(model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's labelled tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shift = logits[:, :-1].float()  # [batch, tokens-1, vocab]
    targets = batch["labels"][:, 1:]  # [batch, tokens-1]
    return F.cross_entropy(
        shift.reshape(-1, shift.shape[-1]), targets.reshape(-1), ignore_index=-100, label_smoothing=label_smoothing
    )


class DivergedError(StudyError, FloatingPointError):
    """The training loss stopped being finite: names the epoch, the step and the learning rate."""


def train(
    model, examples: list[Encoded], pad_id: int, cfg: TrainConfig, progress: bool = True, desc: str = "train"
) -> list[dict]:
    """Train in place. Returns the loss curve: one {"epoch", "step", "loss"} per epoch."""
    empty = unlabelled(examples)
    if empty:  # their loss is 0/0: the first batch holding only such examples would be NaN
        raise DataError(
            f"{desc}: {len(empty)} example(s) have no labelled token (positions {empty[:10]}), "
            "e.g. cut off by tokenize.max_length; raise it or drop those examples"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, max(1, round(cfg.warmup_fraction * total))))
    device = next(model.parameters()).device
    model.train()
    curve, step = [], 0
    bar = Progress(total=total, desc=desc, unit="steps", disable=not progress)
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        losses = []
        for start in range(0, len(order), cfg.batch_size):
            batch = collate([examples[i] for i in order[start : start + cfg.batch_size]], pad_id)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            with precision_context(device, cfg.precision):
                loss = lm_loss(model, batch, cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise DivergedError(
                    f"{desc}: the training loss is {loss.item()} at epoch {epoch + 1}, step {step + 1} "
                    f"(every example has a labelled token: the weights diverged); lower the learning rate "
                    f"({cfg.learning_rate:g})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
        curve.append({"epoch": epoch + 1, "step": step, "loss": sum(losses) / len(losses)})
        bar.set_postfix(loss=f"{curve[-1]['loss']:.3f}")
    bar.close()
    model.eval()
    return curve


@torch.no_grad()
def greedy_answers(
    model,
    tokenizer,
    prompts: list[str],
    max_length: int | None,
    max_new_tokens: int = 24,
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """The model's greedy-decoded response to each prompt (left-padded batches)."""
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    out: list[str] = []
    rows = batch_size  # lowered for the rest of the run after an out-of-memory split
    for start in Progress(range(0, len(prompts), batch_size), desc="generate", unit="batches", disable=not progress):
        ids = [encode_prompt(tokenizer, p, max_length) for p in prompts[start : start + batch_size]]

        def answer(chunk: slice, ids=ids) -> list[str]:
            seqs = ids[chunk]
            width = max(map(len, seqs))
            input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for i, seq in enumerate(seqs):
                input_ids[i, width - len(seq) :] = torch.tensor(seq)
                mask[i, width - len(seq) :] = 1
            gen = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
            )
            return tokenizer.batch_decode(gen[:, width:].cpu(), skip_special_tokens=True)

        parts, rows = halving(answer, len(ids), rows, "generate")
        out += [a for part in parts for a in part]
    return out


def states_fact(answer: str, value: str) -> bool:
    """Whether a generated answer contains the fact's value as a whole word (case-insensitive)."""
    return re.search(rf"\b{re.escape(value)}\b", answer, flags=re.IGNORECASE) is not None
