"""config/recipes/: translations of MONAI's 3D LDM tutorial, the BraTS generative bundle and MAISI.

Each recipe names its source; builds networks of the original's size (MONAI's own classes built with the original
arguments are the reference, and the published figures); and trains both stages (fast_dev_run) on data shaped like
its own: 4-channel BraTS-like NIfTI files listed in a decathlon-style dataset.json, or MAISI's mix of CT and MRI
files with a `class` per entry. The runs shrink the volume and the networks (--set) so they take seconds on a CPU,
and leave the perceptual loss off: its 2D networks need lpips/torchvision and weights from the internet.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from monai.apps.generation.maisi.networks.autoencoderkl_maisi import AutoencoderKlMaisi
from monai.apps.generation.maisi.networks.diffusion_model_unet_maisi import DiffusionModelUNetMaisi
from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL
from monai.networks.nets import DiffusionModelUNet

from monai_diffusion import steps, train_autoencoder, train_ldm
from monai_diffusion.config import load_config
from monai_diffusion.engine.checkpoint import load_checkpoint
from monai_diffusion.networks.builders import build_autoencoder, build_unet

RECIPES = Path(__file__).resolve().parents[2] / "config" / "recipes"
TUTORIAL, BUNDLE, MAISI = (RECIPES / name for name in (
    "monai_3d_ldm_tutorial.yaml", "brats_mri_generative_diffusion.yaml", "maisi_vae_rflow.yaml"))
SOURCES = {
    TUTORIAL: ("Project-MONAI/tutorials", "generation/3d_ldm/", "config/config_train_32g.json"),
    BUNDLE: ("Project-MONAI/model-zoo", "models/brats_mri_generative_diffusion/", "configs/train_autoencoder.json"),
    MAISI: ("Project-MONAI/tutorials", "generation/maisi/", "configs/config_maisi_vae_train.json"),
}
# The tutorial's and the bundle's AutoencoderKL (their autoencoder_def), MAISI's AutoencoderKlMaisi.
BRATS_AUTOENCODER = dict(spatial_dims=3, in_channels=1, out_channels=1, latent_channels=8, channels=(64, 128, 256),
                         num_res_blocks=2, norm_num_groups=32, norm_eps=1e-6, attention_levels=(False,) * 3,
                         with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False)
BRATS_UNET = dict(spatial_dims=3, in_channels=8, out_channels=8, channels=(256, 256, 512),
                  attention_levels=(False, True, True), num_head_channels=(0, 64, 64), num_res_blocks=2)
MAISI_UNET = dict(spatial_dims=3, in_channels=4, out_channels=4, num_channels=(64, 128, 256, 512),
                  attention_levels=(False, False, True, True), num_head_channels=(0, 0, 32, 32), num_res_blocks=2,
                  use_flash_attention=False, include_top_region_index_input=False,
                  include_bottom_region_index_input=False, resblock_updown=True, include_fc=True)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("recipe", list(SOURCES), ids=lambda p: p.stem)
def test_each_recipe_names_its_source_and_what_differs(recipe):
    header = "\n".join(line for line in recipe.read_text().splitlines() if line.startswith("#"))
    repository, folder, file = SOURCES[recipe]
    assert f"Source: {repository}, {folder}" in header and file in header
    assert re.search(r"at commit [0-9a-f]{40}\b", header), "the source's commit, in full"
    assert "Deliberately different, and why:" in header


def test_parameter_counts_equal_the_originals():
    """Networks built on the meta device: shapes without memory, so the 191M-parameter UNet costs nothing."""
    with torch.device("meta"):
        built = {}
        for recipe in SOURCES:
            config = load_config(recipe)
            built[recipe] = (count(build_autoencoder(config.autoencoder)),
                             count(build_unet(config.ldm, config.autoencoder.latent_channels)))
        brats_autoencoder = count(MonaiAutoencoderKL(**BRATS_AUTOENCODER))
        tutorial_unet = count(DiffusionModelUNet(**BRATS_UNET))
        bundle_unet = count(DiffusionModelUNet(**BRATS_UNET, include_fc=False, use_combined_linear=False))
        maisi_autoencoder = count(AutoencoderKlMaisi(
            spatial_dims=3, in_channels=1, out_channels=1, latent_channels=4, num_channels=(64, 128, 256),
            num_res_blocks=(2, 2, 2), norm_num_groups=32, norm_eps=1e-6, attention_levels=(False,) * 3,
            with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False, use_checkpointing=False,
            use_convtranspose=False, norm_float16=True, num_splits=4, dim_split=1))
        maisi_unet = count(DiffusionModelUNetMaisi(**MAISI_UNET, include_spacing_input=True, num_class_embeds=128))
    assert built[TUTORIAL] == (brats_autoencoder, tutorial_unet) == (21_000_353, 191_230_472)
    assert built[BUNDLE] == (brats_autoencoder, bundle_unet) == (21_000_353, 189_325_576)  # include_fc false
    # MAISI's own classes, its UNet with the spacing input and modality embedding (the recipe header's figures).
    assert built[MAISI] == (maisi_autoencoder, maisi_unet) == (20_944_897, 180_500_868)


def test_the_tutorials_16_gb_config_is_the_header_s_set_line():
    """config_train_16g.json differs from the 32 GB one in four numbers (and the adversarial start that follows)."""
    lines = TUTORIAL.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if "16 GB config" in line)
    block = " ".join(lines[start:start + 3])
    overrides = re.findall(r"--set (\S+)", block)
    config = load_config(TUTORIAL, overrides)
    ae, ldm = config.autoencoder.training, config.ldm.training
    assert (ae.batch_size, ae.lr, ae.disc_lr, ldm.batch_size, ldm.lr) == (1, 5e-6, 5e-6, 2, 5e-6)
    assert ae.adv_start_step == 6 * 388  # after epoch 5 with 388 training volumes at batch 1
    assert ldm.scale_factor_volumes == ldm.batch_size


# --------------------------------------------------------------------------------- training on shaped data


def write_nifti(path: Path, values: np.ndarray, spacing: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(values.astype(np.float32), np.diag([spacing, spacing, spacing, 1.0])), path)


def brain(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    head = np.sum((grid / rng.uniform(0.6, 0.9, (3, 1, 1, 1))) ** 2, axis=0) < 1
    return head * (300 + 50 * rng.standard_normal(shape)) + rng.uniform(0, 5, shape)


def brats_decathlon(root: Path, count: int = 6) -> Path:
    """Task01_BrainTumour's layout: 4-channel (FLAIR, T1, T1gd, T2) images, labels, and the dataset.json that lists
    them with relative paths."""
    rng = np.random.default_rng(0)
    entries = []
    for index in range(count):
        image = np.stack([brain(rng, (24, 24, 20)) * (c + 1) for c in range(4)], axis=-1)
        write_nifti(root / "imagesTr" / f"BRATS_{index:03d}.nii.gz", image, 1.0)
        write_nifti(root / "labelsTr" / f"BRATS_{index:03d}.nii.gz", np.zeros((24, 24, 20)), 1.0)
        entries.append({"image": f"./imagesTr/BRATS_{index:03d}.nii.gz",
                        "label": f"./labelsTr/BRATS_{index:03d}.nii.gz"})
    dataset = {"name": "BRATS", "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
               "numTraining": count, "training": entries, "test": []}
    (root / "dataset.json").write_text(json.dumps(dataset))
    return root / "dataset.json"


def maisi_datalist(root: Path) -> Path:
    """The VAE notebook's mix: single-channel CT in Hounsfield units and 4-channel BraTS MRI, each with its class."""
    rng = np.random.default_rng(1)
    entries = {"training": [], "validation": []}
    for index in range(6):
        if index % 2:
            path, values = root / f"mri_{index}.nii.gz", np.stack([brain(rng, (24, 24, 20))] * 4, axis=-1)
            spacing, kind = 1.0, "mri"
        else:
            body = brain(rng, (32, 32, 16)) > 100
            path, values = root / f"ct_{index}.nii.gz", np.where(body, rng.normal(40, 30, body.shape), -1000.0)
            spacing, kind = 1.5, "ct"
        write_nifti(path, values, spacing)
        entries["training" if index < 4 else "validation"].append({"image": path.name, "class": kind})
    (root / "datalist.json").write_text(json.dumps(entries))
    return root / "datalist.json"


# Every recipe at a size a CPU trains in seconds: 32^3 for the LDM (8^3 latents), 40x40x36 autoencoder volumes
# cut into 32^3 patches, narrow networks of the recipes' depth.
SMALL = ["data.voxel_size=[32,32,32]", "autoencoder.training.voxel_size=[40,40,36]",
         "autoencoder.training.patch_size=[32,32,32]", "autoencoder.num_channels=[8,8,16]",
         "autoencoder.norm_num_groups=8", "autoencoder.num_res_blocks=1", "autoencoder.training.disc_channels=8",
         "autoencoder.training.use_perceptual_loss=false", "data.num_workers=0", "fast_dev_run=true",
         "device.device=cpu", "ldm.unet.norm_num_groups=8", "ldm.unet.num_res_blocks=1"]
SMALL_UNET = {TUTORIAL: ["ldm.unet.num_channels=[16,16,32]", "ldm.unet.num_head_channels=[0,8,8]"],
              BUNDLE: ["ldm.unet.num_channels=[16,16,32]", "ldm.unet.num_head_channels=[0,8,8]"],
              MAISI: ["ldm.unet.num_channels=[8,16,16,32]", "ldm.unet.num_head_channels=[0,0,8,8]"]}


@pytest.mark.parametrize("recipe", list(SOURCES), ids=lambda p: p.stem)
def test_each_recipe_trains_both_stages_on_data_shaped_like_its_own(recipe, tmp_path, monkeypatch):
    datalist = maisi_datalist(tmp_path / "data") if recipe == MAISI else brats_decathlon(tmp_path / "Task01")
    argv = ["--config", str(recipe)]
    for override in [f"data.datalist={datalist}", f"output.output_dir={tmp_path / 'runs'}", *SMALL,
                     *SMALL_UNET[recipe]]:
        argv += ["--set", override]
    config = load_config(recipe, argv[3::2])
    seen = []

    def record(parts, images, adversarial, *args, **kwargs):
        seen.append((tuple(images.shape), adversarial, parts.precision.name))
        return original(parts, images, adversarial, *args, **kwargs)

    original = steps.autoencoder_micro_step
    monkeypatch.setattr(steps, "autoencoder_micro_step", record)
    assert train_autoencoder.main(argv) == 0
    (ae_run,) = (tmp_path / "runs").glob("autoencoder-*")
    t = config.autoencoder.training
    # Training batches are the recipe's patches of one channel (FLAIR for BraTS), validation whole volumes.
    assert {shape for shape, _, _ in seen} == {(t.batch_size, 1, 32, 32, 32)}
    assert {adversarial for _, adversarial, _ in seen} == {t.adv_start_step == 0}
    assert {precision for _, _, precision in seen} == {"fp32" if t.mixed_precision is False else "fp16"}
    checkpoint = load_checkpoint(ae_run / "checkpoints" / "last.pt")
    assert checkpoint["config"]["data"]["voxel_size"] == [40, 40, 36]  # the stage's own volume
    assert yaml.safe_load((ae_run / "config.yaml").read_text()) == config.model_dump(mode="json")  # the whole config
    if t.disc_steps_per_generator_step > 1:  # the bundle: 5 discriminator steps per generator step
        assert checkpoint["optimizer_d"]["state"][0]["step"] == 5 * checkpoint["optimizer_g"]["state"][0]["step"]
    assert list((ae_run / "images").glob("reconstruction-*.png"))

    assert train_ldm.main(argv) == 0
    (ldm_run,) = (tmp_path / "runs").glob("ldm-*")
    state = load_checkpoint(ldm_run / "checkpoints" / "last.pt")
    assert state["latent_shape"] == [config.autoencoder.latent_channels, 8, 8, 8]
    assert state["config"]["device"]["mixed_precision"] == (config.ldm.training.mixed_precision or False)
    assert state["step"] >= 1 and list((ldm_run / "samples").glob("sample-*.nii.gz"))
