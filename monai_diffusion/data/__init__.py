"""Data: volume listing (folder / datalist / demo), screening, MONAI transforms and DataLoaders."""

from monai_diffusion.data.datasets import build_dataloaders, make_dataset
from monai_diffusion.data.demo import build_demo_dataset
from monai_diffusion.data.sources import check_volume, list_volumes, screen_volumes, split_train_val
from monai_diffusion.data.transforms import ValidateVolumed, build_transforms
from monai_diffusion.data.workers import loader_worker_init

__all__ = [
    "ValidateVolumed",
    "build_dataloaders",
    "build_demo_dataset",
    "build_transforms",
    "check_volume",
    "list_volumes",
    "loader_worker_init",
    "make_dataset",
    "screen_volumes",
    "split_train_val",
]
