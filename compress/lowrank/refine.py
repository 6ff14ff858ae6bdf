"""End-to-end refinement of extracted LoRA factors: distillation against the tuned model.

Per-module SVD (plain, diagonal or whitened) minimises each module's own error; what a user measures is the whole
model's next-token distribution. :func:`refine_factors` takes the factors every module got from its SVD and moves
them all together to minimise the mean per-token KL(tuned || base + adapter) on calibration text, with Adam (the
base weights frozen, the models in eval mode: no dropout, so a run is deterministic). Part of the text is held out:
the factors are kept only if the held-out KL went down, so refinement cannot make the adapter worse on text it did
not train on.

This module knows torch modules, not files: the caller builds the two models and says which modules carry which
factors (:class:`Factors`); the factors come back refined, in their own dtype.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class RefineOptions:
    """``steps`` Adam steps at learning rate ``lr`` on batches of ``batch`` calibration samples; ``holdout`` of the
    samples (at least one) only measure the KL before and after."""

    steps: int
    lr: float = 2e-4
    batch: int = 4
    holdout: float = 0.125

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"--refine-steps must be at least 1, got {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--refine-lr must be a positive number, got {self.lr}")
        if self.batch < 1:
            raise ValueError(f"the refinement batch must be at least 1 sample, got {self.batch}")
        if not 0 < self.holdout < 1:
            raise ValueError(f"the held-out share must be in (0, 1), got {self.holdout}")

    def split(self, n_samples: int) -> tuple[int, int]:
        """(training, held-out) sample counts for ``n_samples`` calibration samples."""
        held = max(1, round(n_samples * self.holdout))
        return n_samples - held, held


@dataclass
class Factors:
    """One adapted module's factors: ``A`` [r, in] (or [r, in/g] pooled, or [r, vocab] for an embedding), ``B``
    [out, r]. The update is ``x @ A^T @ B^T`` for a Linear; with ``group`` (QA-LoRA) the input is first summed over
    each group of ``group`` consecutive channels and scaled by ``pooling``; for an embedding (``embedding``) the
    rows of ``A^T`` are looked up by token id."""

    A: torch.Tensor
    B: torch.Tensor
    group: int | None = None
    pooling: float = 1.0
    embedding: bool = False

    def update(self, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """The module's output change for its input ``x`` ([..., in] features, or [...] token ids)."""
        if self.embedding:
            return torch.nn.functional.embedding(x, A.T) @ B.T
        if self.group is not None:
            x = x.unflatten(-1, (-1, self.group)).sum(-1) * self.pooling
        return (x.to(A.dtype) @ A.T) @ B.T


@dataclass
class RefineResult:
    """What refinement did: held-out KL (nats per token) before and after, whether the refined factors were kept,
    the training KL every ``every`` steps, and the seconds."""

    steps: int
    train_samples: int
    heldout_samples: int
    kl_before: float
    kl_after: float
    kept: bool
    seconds: float
    train_kl: list[float] = field(default_factory=list)
    every: int = 10

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "train_samples": self.train_samples, "heldout_samples": self.heldout_samples,
                "heldout_kl_before": self.kl_before, "heldout_kl_after": self.kl_after, "kept": self.kept,
                "seconds": round(self.seconds, 1), f"train_kl_every_{self.every}_steps": self.train_kl}


def token_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student), float32: ``student_logits`` [n, L, V] (any float dtype),
    ``teacher_logprobs`` [n, L, V] log-probabilities."""
    logprobs = student_logits.float().log_softmax(-1)
    per_token = (teacher_logprobs.exp() * (teacher_logprobs - logprobs)).sum(-1)
    return per_token.mean()


@contextmanager
def adapted(model: torch.nn.Module, factors: dict[str, Factors], params: dict[str, tuple[torch.Tensor, torch.Tensor]]
            ) -> Iterator[None]:
    """``model`` with every module named in ``factors`` adding its update (from ``params[name]`` = (A, B)) to its
    output, by forward hooks removed on exit."""
    handles = []
    modules = dict(model.named_modules())
    for name, f in factors.items():
        def hook(module: Any, args: tuple[Any, ...], output: torch.Tensor, f: Factors = f, name: str = name
                 ) -> torch.Tensor:
            A, B = params[name]
            return output + f.update(args[0], A, B).to(output.dtype)

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _heldout_kl(student: Any, teacher: Any, tokens: torch.Tensor, batch: int) -> float:
    total = 0.0
    for i in range(0, tokens.shape[0], batch):
        x = tokens[i:i + batch]
        target = teacher(input_ids=x).logits.float().log_softmax(-1)
        total += float(token_kl(student(input_ids=x).logits, target)) * x.shape[0]
    return total / tokens.shape[0]


def refine_factors(student: Any, teacher: Any, factors: dict[str, Factors], tokens: torch.Tensor,
                   options: RefineOptions, *, seed: int = 0,
                   progress: Callable[[int, float], None] | None = None) -> tuple[dict[str, Factors], RefineResult]:
    """Refine ``factors`` (module name -> factors, modules of ``student``) so that ``student`` with them matches
    ``teacher``'s next-token distributions on ``tokens`` [n, L] (token ids, on the models' device).

    ``student`` is the base model (with whatever the adapter holds besides these factors already applied),
    ``teacher`` the tuned model; both stay unchanged. The samples are split by a permutation seeded with ``seed``
    into training and held-out ones (:meth:`RefineOptions.split`); training visits the training samples in seeded
    random order, epoch after epoch. Returns the refined factors (in their dtype; the given ones when the held-out KL
    did not go down) and what happened. ``progress(step, training KL)`` is called after every step.
    """
    n = tokens.shape[0]
    n_train, n_held = options.split(n)
    if n_train < 1:
        raise ValueError(f"refinement needs at least 2 calibration samples (one held out), got {n}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    train, held = tokens[order[n_held:]], tokens[order[:n_held]]
    frozen = [p for p in list(student.parameters()) + list(teacher.parameters()) if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    student.eval()
    teacher.eval()
    device = tokens.device
    params = {name: (f.A.detach().to(device, torch.float32, copy=True).requires_grad_(True),
                     f.B.detach().to(device, torch.float32, copy=True).requires_grad_(True))
              for name, f in factors.items()}
    started = time.perf_counter()
    result = RefineResult(options.steps, n_train, n_held, 0.0, 0.0, False, 0.0)
    try:
        with adapted(student, factors, params):
            result.kl_before = _heldout_kl(student, teacher, held, options.batch)
            optimizer = torch.optim.Adam([t for pair in params.values() for t in pair], lr=options.lr)
            queue: list[int] = []
            window: list[float] = []
            for step in range(options.steps):
                while len(queue) < options.batch:
                    queue += torch.randperm(n_train, generator=generator).tolist()
                pick, queue = queue[:options.batch], queue[options.batch:]
                x = train[pick]
                with torch.no_grad():
                    target = teacher(input_ids=x).logits.float().log_softmax(-1)
                loss = token_kl(student(input_ids=x).logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                window.append(value)
                if len(window) == result.every or step == options.steps - 1:
                    result.train_kl.append(sum(window) / len(window))
                    window = []
                if progress is not None:
                    progress(step + 1, value)
            result.kl_after = _heldout_kl(student, teacher, held, options.batch)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    result.seconds = time.perf_counter() - started
    result.kept = result.kl_after < result.kl_before
    if not result.kept:
        return factors, result
    refined = {name: Factors(A.detach().to(f.A.device, f.A.dtype), B.detach().to(f.B.device, f.B.dtype), f.group,
                             f.pooling, f.embedding)
               for (name, f), (A, B) in zip(factors.items(), params.values(), strict=True)}
    return refined, result
