"""The distillation step (torch): the student learns the teacher's top-k next-token distribution.

Loss per position, with p the teacher's top-k renormalised (cached by `distill_data`) and q the
student's full softmax:

    KL_k(p || q) = sum_{i in top-k} p_i (log p_i - log q_i)

averaged over positions; optionally plus `hidden_weight` times the hidden-state MSE at mapped
blocks (each normalised by the teacher state's mean square, so the weight is scale-free). The
student's log q_i needs its logsumexp over the whole vocabulary: it is pushed to put its mass
where the teacher's top-k is, not only to rank the k among themselves. AdamW (no weight decay:
the student starts next to its target), linear warm-up then a constant rate, gradients clipped
to norm 1. Windows are visited in a fresh permutation each epoch, derived from the seed and the
epoch, so a resumed run sees exactly the windows the uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from edgellm.compress.distill_data import TeacherTargets
from edgellm.compress.torch_bridge import LlamaModule

CLIP_NORM = 1.0


@dataclass(slots=True)
class TrainSettings:
    """What the run's identity covers: changing any of these is another run."""

    batch: int  # windows per step
    lr: float  # peak learning rate
    warmup: int  # steps of linear warm-up to `lr`
    hidden_weight: float  # weight of the hidden-state term; 0: off
    train_from: int  # blocks of the student below this index stay frozen
    train_embeddings: bool  # also train the token embeddings (the tied head with them)
    bf16: bool  # compute in bfloat16 under autocast (weights and optimizer stay float32)
    seed: int  # window order


class Trainer:
    """The student, its optimizer and the targets; `step(n)` runs optimizer step n."""

    def __init__(
        self,
        student: LlamaModule,
        targets: TeacherTargets,
        settings: TrainSettings,
        teacher: LlamaModule | None = None,
        layer_map: list[tuple[int, int]] | None = None,
    ):
        self.student = student.train()
        self.targets = targets
        self.settings = settings
        self.teacher = teacher.eval() if teacher is not None else None
        self.layer_map = layer_map or []  # (student hidden index, teacher hidden index)
        self.trainable = select_trainable(student, settings)
        self.optimizer = torch.optim.AdamW(
            [p for _, p in self.trainable], lr=settings.lr, weight_decay=0.0
        )

    @property
    def tokens_per_step(self) -> int:
        return self.settings.batch * int(self.targets.windows.shape[1])

    def rows(self, step: int) -> np.ndarray[Any, Any]:
        """Window indices of step `step`: positions step*B .. of the epoch permutations."""
        n = len(self.targets.windows)
        first = step * self.settings.batch
        out = np.empty(self.settings.batch, dtype=np.int64)
        for j in range(self.settings.batch):
            epoch, at = divmod(first + j, n)
            out[j] = np.random.default_rng([self.settings.seed, epoch]).permutation(n)[at]
        return out

    def step(self, step: int) -> float:
        """One optimizer step; returns its loss (KL, plus the weighted hidden term)."""
        rows = self.rows(step)
        tokens = torch.from_numpy(self.targets.windows[rows].astype(np.int64))  # [B, L]
        ids = torch.from_numpy(self.targets.ids[rows].astype(np.int64))  # [B, L, k]
        logp = torch.from_numpy(self.targets.logprobs[rows].astype(np.float32))  # [B, L, k]
        lr = self.settings.lr * min(1.0, (step + 1) / max(1, self.settings.warmup))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self._autocast():
            loss = self._loss(tokens, ids, logp)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], CLIP_NORM)
        self.optimizer.step()
        return float(loss.detach())

    def _loss(self, tokens: Tensor, ids: Tensor, logp: Tensor) -> Tensor:
        if not self.layer_map or self.teacher is None or not self.settings.hidden_weight:
            logits = self.student(tokens)
            return topk_kl(logits, ids, logp)
        logits, states = self.student(tokens, hidden=True)
        with torch.no_grad():
            _, teacher_states = self.teacher(tokens, hidden=True)
        mse = torch.stack(
            [
                F.mse_loss(states[s].float(), teacher_states[t].float())
                / teacher_states[t].float().pow(2).mean()
                for s, t in self.layer_map
            ]
        ).mean()
        return topk_kl(logits, ids, logp) + self.settings.hidden_weight * mse

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.settings.bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the step: trained tensors and the optimizer."""
        return {
            "trainable": {name: p.detach().clone() for name, p in self.trainable},
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, p in self.trainable:
                p.copy_(state["trainable"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])


def topk_kl(logits: Tensor, ids: Tensor, logp: Tensor) -> Tensor:
    """Mean over positions of KL(p || q) on the teacher's top-k. logits: [B, L, V] (student);
    ids, logp: [B, L, k] (teacher's ids and renormalised log-probabilities)."""
    logits = logits.float()
    logq = logits.gather(-1, ids) - torch.logsumexp(logits, dim=-1, keepdim=True)  # [B, L, k]
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def select_trainable(student: LlamaModule, settings: TrainSettings) -> list[tuple[str, Tensor]]:
    """(name, parameter) of what trains; the rest get requires_grad False (no gradient is
    computed for them, and none flows below the lowest trained block)."""
    chosen: list[tuple[str, Tensor]] = []
    for name, p in student.named_parameters():
        if name.startswith("layers."):
            keep = int(name.split(".")[1]) >= settings.train_from
        elif name == "token_embd.weight" or name.startswith("output."):
            keep = settings.train_embeddings
        else:  # output_norm
            keep = True
        p.requires_grad_(keep)
        if keep:
            chosen.append((name, p))
    return chosen


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
