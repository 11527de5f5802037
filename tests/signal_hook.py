"""Test fixture: a run that sends itself a stop signal at a chosen micro-batch.

With ``MONAI_DIFFUSION_TEST_SIGNAL="SIGTERM:5"`` set, the training loop's process sends itself SIGTERM just before
it trains micro-batch 5 of the run (counted from 0 over all epochs); ``"SIGTERM:5:1"`` does so on rank 1 only. The
tests use it to interrupt a run at a chosen point. :func:`install` wraps the engine's ``epoch_batches``: conftest
installs it in the test process, and ``subprocess_hooks/sitecustomize.py`` in the commands the tests start (on
their ``PYTHONPATH``). The package itself reads no test variable.
"""

from __future__ import annotations

import os
import signal

TEST_SIGNAL_ENV = "MONAI_DIFFUSION_TEST_SIGNAL"


def _target() -> tuple[int, int] | None:
    """(signal, micro-batch) asked of this rank, or None."""
    value = os.environ.get(TEST_SIGNAL_ENV)
    if not value:
        return None
    name, micro_batch, *rank = value.split(":")
    if rank and int(rank[0]) != int(os.environ.get("RANK", "0")):
        return None
    return int(signal.Signals[name]), int(micro_batch)


def install() -> None:
    """Wrap ``monai_diffusion.engine.loop.epoch_batches`` (once) so that it sends the asked signal."""
    from monai_diffusion.engine import loop

    original = loop.epoch_batches
    if getattr(original, "signals", False):
        return

    def epoch_batches(loader, budget, skip, epoch):
        target = _target()
        for index, batch in original(loader, budget, skip, epoch):
            if target is not None and epoch * budget.micro_batches + index == target[1]:
                os.kill(os.getpid(), target[0])
            yield index, batch

    epoch_batches.signals = True
    loop.epoch_batches = epoch_batches
