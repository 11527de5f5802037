"""DataLoader worker processes: how each one starts.

Its own module so that every loader in ``data`` (the training loaders in :mod:`~monai_diffusion.data.datasets`, the
preprocessing workers in :mod:`~monai_diffusion.data.preprocessed`) starts its workers the same way without one of
those modules importing the other.
"""

from __future__ import annotations

import signal

from monai.data.utils import worker_init_fn as monai_worker_init_fn

__all__ = ["loader_worker_init"]


def loader_worker_init(worker_id: int) -> None:
    """Start a DataLoader worker: it ignores SIGINT and SIGTERM, which reach the whole process group (Ctrl-C,
    torchrun's agent, a scheduler) but are the training process's to act on (it stops at a step boundary and then
    ends its workers); then it seeds MONAI's random transforms per worker, as ``monai.data.DataLoader`` does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    monai_worker_init_fn(worker_id)
