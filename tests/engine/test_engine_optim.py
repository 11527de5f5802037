"""LR schedule values, skipped non-finite steps, and the non-finite loss guard."""

from __future__ import annotations

import math

import pytest
import torch

from monai_diffusion.engine.optim import (
    NonFiniteGuard,
    StepResult,
    build_lr_scheduler,
    build_optimizer,
    optimizer_step,
)


def _lrs(warmup: int, schedule: str, max_steps: int | None, n: int, lr: float = 1.0) -> list[float]:
    """LR used by optimizer steps 0..n-1."""
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], lr=lr, weight_decay=0.0)
    sched = build_lr_scheduler(opt, warmup, schedule, max_steps)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_constant():
    lrs = _lrs(warmup=4, schedule="constant", max_steps=None, n=8, lr=0.1)
    assert lrs == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1, 0.1, 0.1])


def test_no_warmup_constant():
    assert _lrs(0, "constant", None, 3) == [1.0, 1.0, 1.0]


def test_warmup_then_cosine_to_zero():
    lrs = _lrs(warmup=2, schedule="cosine", max_steps=10, n=12)
    assert lrs[0] == pytest.approx(0.5)
    assert lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0)  # cosine starts at the peak
    # halfway through the cosine part (step 2 + 8/2)
    assert lrs[6] == pytest.approx(0.5)
    assert lrs[8] == pytest.approx(0.5 * (1 + math.cos(math.pi * 6 / 8)))
    assert lrs[10] == pytest.approx(0.0, abs=1e-12)
    assert lrs[11] == pytest.approx(0.0, abs=1e-12)  # stays at 0 past max_steps
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_scheduler_bad_arguments():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], lr=1.0, weight_decay=0.0)
    with pytest.raises(ValueError, match="max_steps"):
        build_lr_scheduler(opt, 0, "cosine", None)
    with pytest.raises(ValueError, match="max_steps"):
        build_lr_scheduler(opt, 10, "cosine", 10)
    with pytest.raises(ValueError, match="lr_schedule"):
        build_lr_scheduler(opt, 0, "linear", 10)


def test_build_optimizer_skips_frozen():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    opt = build_optimizer(model.parameters(), lr=1e-3, weight_decay=0.01)
    assert isinstance(opt, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in opt.param_groups) == 2
    assert opt.param_groups[0]["weight_decay"] == 0.01


def _setup(warmup: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = build_optimizer(model.parameters(), lr=0.1, weight_decay=0.0)
    sched = build_lr_scheduler(opt, warmup, "constant", None)
    return model, opt, sched


def _backward(model, scaler, poison: bool = False):
    loss = model(torch.ones(2, 3)).sum()
    if poison:
        loss = loss * float("nan")
    scaler.scale(loss).backward()


def _scalers():
    yield pytest.param(lambda: torch.amp.GradScaler("cpu", enabled=False), id="disabled")
    try:
        torch.amp.GradScaler("cpu", enabled=True)
        available = True
    except Exception:  # older torch: no CPU GradScaler
        available = False
    yield pytest.param(
        lambda: torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True),
        id="enabled",
        marks=pytest.mark.skipif(not available, reason="torch.amp.GradScaler('cpu') unavailable"),
    )


@pytest.mark.parametrize("make_scaler", list(_scalers()))
def test_nan_gradient_step_is_skipped(make_scaler):
    model, opt, sched = _setup()
    scaler = make_scaler()
    before = [p.detach().clone() for p in model.parameters()]
    lr_before, epoch_before = opt.param_groups[0]["lr"], sched.last_epoch
    scale_before = scaler.get_scale() if scaler.is_enabled() else None

    _backward(model, scaler, poison=True)
    result = optimizer_step(opt, scaler, model.parameters(), grad_clip=1.0, lr_scheduler=sched)

    assert result.stepped is False
    assert not math.isfinite(result.grad_norm)
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)
        assert p.grad is None  # gradients cleared
    assert opt.param_groups[0]["lr"] == lr_before and sched.last_epoch == epoch_before
    assert not opt.state  # AdamW never ran (no moment buffers, no step count)
    if scaler.is_enabled():
        assert scaler.get_scale() < scale_before  # the scaler backed off

    # A healthy step afterwards goes through and advances the schedule.
    _backward(model, scaler)
    result = optimizer_step(opt, scaler, model.parameters(), grad_clip=1.0, lr_scheduler=sched)
    assert result.stepped is True and math.isfinite(result.grad_norm)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert sched.last_epoch == epoch_before + 1
    assert opt.param_groups[0]["lr"] > lr_before


def test_grad_norm_is_pre_clip_and_clipping_applies():
    model, opt, _ = _setup()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss = model(torch.full((1, 3), 100.0)).sum()
    loss.backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    seen = {}
    orig_step = opt.step

    def spy_step(*args, **kwargs):  # gradient norm as the optimizer sees it
        seen["norm"] = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
        return orig_step(*args, **kwargs)

    opt.step = spy_step
    result = optimizer_step(opt, scaler, model.parameters(), grad_clip=0.5)
    assert result.stepped and result.grad_norm == pytest.approx(expected, rel=1e-5)
    assert seen["norm"] == pytest.approx(0.5, rel=1e-4)


def test_grad_norm_without_clipping_leaves_gradients():
    model, opt, _ = _setup()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    model(torch.full((1, 3), 100.0)).sum().backward()
    expected = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    result = optimizer_step(opt, scaler, model.parameters(), grad_clip=None)
    assert result.grad_norm == pytest.approx(expected, rel=1e-5)


def test_non_finite_guard():
    guard = NonFiniteGuard(limit=3)
    assert guard.check(1.0, step=1)
    assert not guard.check(float("nan"), step=2)
    assert not guard.check(float("inf"), step=3)
    assert guard.check(0.5, step=4)  # resets the count
    assert not guard.check(float("nan"), step=5)
    assert not guard.check(float("nan"), step=6)
    with pytest.raises(RuntimeError, match=r"3 consecutive non-finite losses, last at step 7"):
        guard.check(float("nan"), step=7)


def test_non_finite_guard_accepts_tensors():
    guard = NonFiniteGuard(limit=1)
    assert guard.check(torch.tensor(2.0), step=0)
    with pytest.raises(RuntimeError, match="step 9"):
        guard.check(torch.tensor(float("nan")), step=9)


def test_non_finite_guard_stops_a_run_whose_updates_are_all_skipped():
    """Finite losses, non-finite gradients (bf16 autocast on CPU in MONAI's UNet): every update is skipped, and a
    run that never trains must not end as if it had."""
    guard = NonFiniteGuard(limit=3)
    guard.check_update(StepResult(stepped=False, grad_norm=float("nan")), step=1)
    guard.check_update(StepResult(stepped=True, grad_norm=1.0), step=2)  # resets the count
    guard.check_update(StepResult(stepped=False, grad_norm=float("inf")), step=3)
    guard.check_update(StepResult(stepped=False, grad_norm=float("nan")), step=4)
    with pytest.raises(RuntimeError, match=r"3 optimizer steps in a row had non-finite gradients .* step 5.*"
                                           r"mixed_precision"):
        guard.check_update(StepResult(stepped=False, grad_norm=float("nan")), step=5)


def test_multistep_and_polynomial_are_pytorchs_own():
    """'multistep' and 'polynomial' give the LRs of torch's MultiStepLR and PolynomialLR, step for step."""
    for schedule, reference, kwargs in (
        ("multistep", lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.1),
         {"milestones": [2, 5], "gamma": 0.1}),
        ("polynomial", lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=6, power=2.0), {"power": 2.0}),
    ):
        ours_opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], lr=1e-4, weight_decay=0.0)
        ours = build_lr_scheduler(ours_opt, 0, schedule, 6, **kwargs)
        torch_opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        theirs = reference(torch_opt)
        assert type(ours) is type(theirs)
        seen = []
        for _ in range(8):
            assert ours_opt.param_groups[0]["lr"] == pytest.approx(torch_opt.param_groups[0]["lr"])
            seen.append(ours_opt.param_groups[0]["lr"])
            ours_opt.step(), torch_opt.step(), ours.step(), theirs.step()
        expected = {"multistep": [1e-4, 1e-4, 1e-5, 1e-5, 1e-5, 1e-6, 1e-6, 1e-6],
                    "polynomial": [1e-4 * (1 - s / 6) ** 2 for s in range(6)] + [0.0, 0.0]}[schedule]
        assert seen == pytest.approx(expected)


def test_multistep_and_polynomial_refuse_what_they_cannot_do():
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], lr=1.0, weight_decay=0.0)
    with pytest.raises(ValueError, match="takes no warm-up"):
        build_lr_scheduler(opt, 3, "multistep", None, milestones=[10])
    with pytest.raises(ValueError, match="needs milestones"):
        build_lr_scheduler(opt, 0, "multistep", None)
    with pytest.raises(ValueError, match="'polynomial' needs max_steps"):
        build_lr_scheduler(opt, 0, "polynomial", None)


def test_adam_eps_reaches_the_optimizer():
    assert build_optimizer([torch.nn.Parameter(torch.zeros(1))], lr=1.0, weight_decay=0.0).defaults["eps"] == 1e-8
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], lr=1.0, weight_decay=0.0, eps=1e-6)
    assert opt.defaults["eps"] == 1e-6
