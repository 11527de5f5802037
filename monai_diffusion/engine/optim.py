"""Optimizer, LR schedule, one guarded optimizer step, and a stop on repeated non-finite losses."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, MultiStepLR, PolynomialLR

__all__ = ["StepResult", "build_optimizer", "build_lr_scheduler", "optimizer_step", "NonFiniteGuard"]


def build_optimizer(
    parameters: Iterable[torch.nn.Parameter] | Iterable[dict],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    *, eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (with weight_decay 0 it is Adam, which MONAI's recipes use).

    Args:
        parameters: ``model.parameters()`` (frozen ones are left out) or a list of param groups.
        lr: learning rate (the peak, reached after warm-up).
        weight_decay: decoupled weight decay (0 turns it off; AdamW's own default is 0.01).
        betas: Adam moment coefficients.
        eps: added to the denominator (PyTorch's default 1e-8; larger values steady fp16 training).

    Returns:
        The optimizer.

    Raises:
        ValueError: no trainable parameters.
    """
    params = list(parameters)
    if params and not isinstance(params[0], dict):
        params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    schedule: str,
    max_steps: int | None,
    *, milestones: Sequence[int] = (),
    gamma: float = 0.1,
    power: float = 1.0,
) -> LRScheduler:
    """Linear warm-up, then a constant or cosine LR; or PyTorch's MultiStepLR / PolynomialLR.

    Steps count calls of ``scheduler.step()``: once per optimizer step, or once per epoch for a schedule in epochs
    (the caller decides; ``warmup_steps``, ``max_steps`` and ``milestones`` count in the same unit).

    The LR of optimizer step ``s`` (0-based, i.e. after ``s`` calls of ``scheduler.step()``) is
    ``lr * (s + 1) / warmup_steps`` while ``s < warmup_steps`` (so the first step is not wasted
    at LR 0), then ``lr`` ("constant") or ``lr * 0.5 * (1 + cos(pi * (s - warmup_steps) /
    (max_steps - warmup_steps)))`` ("cosine"), which is 0 from ``max_steps`` on.

    One ``LambdaLR`` with a piecewise factor rather than ``SequentialLR``: one scheduler, one
    step counter in the checkpoint, and no sub-scheduler touching the LR at construction.

    ``"multistep"`` is ``MultiStepLR(milestones, gamma)`` and ``"polynomial"`` is ``PolynomialLR(total_iters=max_steps,
    power)`` (0 from ``max_steps`` on), as MONAI's 3D LDM tutorial and MAISI use them: without warm-up.

    Args:
        optimizer: the optimizer whose param groups' ``lr`` is the peak LR.
        warmup_steps: warm-up length in scheduler steps (0: none).
        schedule: ``"constant"``, ``"cosine"``, ``"multistep"`` or ``"polynomial"``.
        max_steps: total scheduler steps; required for ``"cosine"`` and ``"polynomial"``.
        milestones: ``"multistep"``: the steps at which the LR is multiplied by ``gamma``.
        gamma: ``"multistep"``: the factor.
        power: ``"polynomial"``: the decay's power.

    Returns:
        A ``LambdaLR``, ``MultiStepLR`` or ``PolynomialLR`` (its ``state_dict`` restores the step count).

    Raises:
        ValueError: unknown schedule, negative warm-up, cosine without ``max_steps > warmup_steps``, warm-up with
            multistep/polynomial, polynomial without ``max_steps``, multistep without milestones.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule not in ("constant", "cosine", "multistep", "polynomial"):
        raise ValueError(f"lr_schedule must be 'constant', 'cosine', 'multistep' or 'polynomial', got {schedule!r}")
    if schedule in ("multistep", "polynomial"):
        if warmup_steps:
            raise ValueError(f"lr_schedule {schedule!r} takes no warm-up, got warmup_steps={warmup_steps}")
        if schedule == "multistep":
            if not milestones:
                raise ValueError("lr_schedule 'multistep' needs milestones")
            return MultiStepLR(optimizer, milestones=list(milestones), gamma=gamma)
        if max_steps is None or max_steps < 1:
            raise ValueError(f"lr_schedule 'polynomial' needs max_steps >= 1, got {max_steps}")
        return PolynomialLR(optimizer, total_iters=max_steps, power=power)
    if schedule == "cosine" and (max_steps is None or max_steps <= warmup_steps):
        raise ValueError(
            f"lr_schedule 'cosine' needs max_steps > warmup_steps, got max_steps={max_steps}, "
            f"warmup_steps={warmup_steps}"
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (max_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


@dataclass
class StepResult:
    """Outcome of :func:`optimizer_step`.

    Attributes:
        stepped: False when the step was skipped for non-finite gradients.
        grad_norm: total L2 norm of the (unscaled) gradients before clipping; may be inf/nan.
    """

    stepped: bool
    grad_norm: float


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    parameters: Iterable[torch.nn.Parameter],
    grad_clip: float | None,
    *, lr_scheduler: LRScheduler | None = None,
) -> StepResult:
    """Unscale, measure/clip, step, update the scaler, zero the gradients; skip non-finite steps.

    Call after the last micro-batch's ``scaler.scale(loss).backward()``. When the gradients hold
    inf/nan the optimizer and ``lr_scheduler`` are not stepped (a skipped step must not eat into
    warm-up or the cosine), the scaler still updates (an fp16 scaler backs off its scale), and
    the gradients are cleared. Under DDP the gradients are already averaged, so every rank takes
    the same decision.

    Args:
        optimizer: the optimizer.
        scaler: its scaler from ``Precision.make_scaler()`` (disabled for fp32/bf16).
        parameters: the parameters the optimizer updates (for the norm and clipping).
        grad_clip: clip the total gradient norm to this; None: measure only.
        lr_scheduler: stepped only when the optimizer stepped.

    Returns:
        :class:`StepResult` with whether it stepped and the pre-clip gradient norm.
    """
    params = [p for p in parameters if p.grad is not None]
    scaler.unscale_(optimizer)  # no-op when the scaler is disabled
    # The norm is always computed (it is logged); clipping reuses it instead of recomputing.
    norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
    grad_norm = float(norm)
    stepped = math.isfinite(grad_norm)
    if stepped:
        if grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, grad_clip, norm)
        scaler.step(optimizer)
    # After unscale_ the scaler has recorded found_inf, so update() works without step() and an
    # fp16 scaler lowers its scale after a skipped step.
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if stepped and lr_scheduler is not None:
        lr_scheduler.step()
    return StepResult(stepped=stepped, grad_norm=grad_norm)


class NonFiniteGuard:
    """Stop a run that keeps producing inf/nan losses instead of training on garbage.

    Isolated non-finite losses (common in early fp16 training) are tolerated; ``limit`` in a row
    are not. Under DDP pass a loss already averaged over ranks (``all_reduce_mean``) so every
    rank stops together instead of one rank raising while the others wait.

    Args:
        limit: consecutive non-finite losses that stop the run (``max_nonfinite_steps``).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"NonFiniteGuard limit must be >= 1, got {limit}")
        self.limit = limit
        self.count = 0
        self.skipped = 0

    def check(self, loss_value: float, step: int) -> bool:
        """Record one loss.

        Args:
            loss_value: the loss (a float or one-element tensor).
            step: the current optimizer step, named in the error.

        Returns:
            True if the loss is finite (the counter resets), False if it is not (skip the step).

        Raises:
            RuntimeError: on the ``limit``-th consecutive non-finite loss.
        """
        if math.isfinite(float(loss_value)):
            self.count = 0
            return True
        self.count += 1
        if self.count >= self.limit:
            raise RuntimeError(
                f"Stopping: {self.limit} consecutive non-finite losses, last at step {step} "
                f"(last value {float(loss_value)}). Try a lower learning rate, gradient clipping, "
                "or mixed_precision bf16/false."
            )
        return False

    def check_update(self, result: StepResult, step: int) -> None:
        """Record one optimizer update: a run whose updates are all skipped (non-finite gradients from finite
        losses) would otherwise finish "successfully" with its initial weights.

        Args:
            result: what :func:`optimizer_step` returned.
            step: the optimizer step just attempted, named in the error.

        Raises:
            RuntimeError: on the ``limit``-th consecutive skipped update.
        """
        self.skipped = 0 if result.stepped else self.skipped + 1
        if self.skipped >= self.limit:
            raise RuntimeError(
                f"Stopping: {self.limit} optimizer steps in a row had non-finite gradients (from finite losses), "
                f"the last at step {step}, so none of them trained. bf16 autocast on CPU produces such gradients in "
                "some networks (MONAI's diffusion UNet among them): set this stage's mixed_precision to false "
                "(e.g. ldm.training.mixed_precision: false); otherwise lower the learning rate or clip gradients."
            )
