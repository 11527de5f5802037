"""Training engine: small functions the recipes call top to bottom.

``precision`` (autocast, grad scalers), ``optim`` (AdamW, LR schedule, guarded step),
``checkpoint`` (atomic save, checked load, finding a run's checkpoint, resume), ``distributed`` (torchrun/DDP),
``ema`` (weight averaging), ``logging`` (console, TensorBoard, slice panels, NIfTI outputs) and
``loop`` (run folder, step budget, end-of-epoch checkpoints, stopping on SIGINT / SIGTERM: the loop the
three recipes share).
"""

from monai_diffusion.engine.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    capture_rng_state,
    check_shape_keys,
    find_checkpoint,
    load_checkpoint,
    newest_checkpoint,
    prune_checkpoints,
    resolve_resume,
    restore_rng_state,
    save_checkpoint,
)
from monai_diffusion.engine.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup_distributed,
    gradient_sync,
    init_distributed,
    is_distributed,
    unwrap,
    wrap_ddp,
)
from monai_diffusion.engine.ema import build_ema
from monai_diffusion.engine.logging import RunLogger, get_logger, peak_memory_mb, save_png, set_log_rank, volume_panel
from monai_diffusion.engine.optim import (
    NonFiniteGuard,
    StepResult,
    build_lr_scheduler,
    build_optimizer,
    optimizer_step,
)
from monai_diffusion.engine.precision import Precision, precision_name, resolve_precision

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "DistInfo",
    "NonFiniteGuard",
    "Precision",
    "RunLogger",
    "StepResult",
    "all_reduce_mean",
    "barrier",
    "broadcast_object",
    "build_ema",
    "build_lr_scheduler",
    "build_optimizer",
    "capture_rng_state",
    "check_shape_keys",
    "cleanup_distributed",
    "find_checkpoint",
    "get_logger",
    "gradient_sync",
    "init_distributed",
    "is_distributed",
    "load_checkpoint",
    "newest_checkpoint",
    "optimizer_step",
    "peak_memory_mb",
    "precision_name",
    "prune_checkpoints",
    "resolve_precision",
    "resolve_resume",
    "restore_rng_state",
    "save_checkpoint",
    "save_png",
    "set_log_rank",
    "unwrap",
    "volume_panel",
    "wrap_ddp",
]
