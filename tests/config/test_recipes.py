"""config/recipes/: translations of MONAI's 3D LDM tutorial, the BraTS generative bundle and MAISI, and the
fine-tuning of MAISI's released rectified-flow CT model.

Each recipe names its source, passes ``monai-diffusion validate``, and builds networks of the original's size
(MONAI's own classes built with the original arguments are the reference, and the published figures). The
translations train both stages (fast_dev_run) on data shaped like their own: 4-channel BraTS-like NIfTI files listed
in a decathlon-style dataset.json, or MAISI's mix of CT and MRI files with a `class` per entry; the fine-tuning recipe
fine-tunes from files in MAISI's release layout on CT volumes. The runs shrink the volume and the networks (--set) so
they take seconds on a CPU, and leave the perceptual loss off: its 2D networks need lpips/torchvision and weights from
the internet.
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

from monai_diffusion import steps, train_autoencoder, train_ldm, validate
from monai_diffusion.conditioning import ConditionEncoder
from monai_diffusion.config import load_config
from monai_diffusion.engine.checkpoint import load_checkpoint
from monai_diffusion.latents import voxel_spacing
from monai_diffusion.networks.builders import build_autoencoder, build_unet

RECIPES = Path(__file__).resolve().parents[2] / "config" / "recipes"
TUTORIAL, BUNDLE, MAISI, FINETUNE = (RECIPES / name for name in (
    "monai_3d_ldm_tutorial.yaml", "brats_mri_generative_diffusion.yaml", "maisi_vae_rflow.yaml",
    "maisi_finetune_rflow_ct.yaml"))
SOURCES = {
    TUTORIAL: ("Project-MONAI/tutorials", "generation/3d_ldm/", "config/config_train_32g.json"),
    BUNDLE: ("Project-MONAI/model-zoo", "models/brats_mri_generative_diffusion/", "configs/train_autoencoder.json"),
    MAISI: ("Project-MONAI/tutorials", "generation/maisi/", "configs/config_maisi_vae_train.json"),
    FINETUNE: ("NVIDIA-Medtech/NV-Generate-CTMR", "configs/", "config_maisi_diff_model_rflow-ct.json"),
}
# The recipes that train their autoencoder (the fine-tuning recipe's is MAISI's released one, frozen).
TRAINED_FROM_SCRATCH = [TUTORIAL, BUNDLE, MAISI]
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


@pytest.mark.parametrize("recipe", list(SOURCES), ids=lambda p: p.stem)
def test_each_recipe_passes_validate(recipe, capsys):
    """``monai-diffusion validate`` as users run it (networks built on the meta device: shapes without memory). It
    reads no file but the YAML, so the fine-tuning recipe's released weights need not be here."""
    with torch.device("meta"):
        assert validate.main(["--config", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config is valid")
    if recipe in (MAISI, FINETUNE):
        assert "autoencoder 20,944,897" in out and "diffusion UNet 180,500,868" in out


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
    # MAISI's own classes, its UNet with the spacing input and modality embedding (the recipe header's figures);
    # the fine-tuning recipe's are the released networks themselves (num_splits 4 along dim_split 1, as built here).
    assert built[MAISI] == (maisi_autoencoder, maisi_unet) == (20_944_897, 180_500_868)
    assert built[FINETUNE] == (maisi_autoencoder, maisi_unet)


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


@pytest.mark.parametrize("recipe", TRAINED_FROM_SCRATCH, ids=lambda p: p.stem)
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


# --------------------------------------------------------------------------- fine-tuning from released files


def ct_datalist(root: Path, count: int = 4) -> Path:
    """CT volumes in Hounsfield units (a soft-tissue body in air) at 2.5 mm, listed without a class."""
    rng = np.random.default_rng(2)
    entries = []
    for index in range(count):
        body = brain(rng, (24, 24, 20)) > 100
        write_nifti(root / f"ct_{index}.nii.gz", np.where(body, rng.normal(40, 30, body.shape), -1000.0), 2.5)
        entries.append({"image": f"ct_{index}.nii.gz"})
    (root / "ct_datalist.json").write_text(json.dumps({"training": entries}))
    return root / "ct_datalist.json"


# The fine-tuning recipe at a CPU's size: its networks' depth, narrow; 32^3 volumes (8^3 latents) in 2 slabs.
SMALL_FINETUNE = ["data.voxel_size=[32,32,32]", "autoencoder.num_channels=[8,8,16]", "autoencoder.norm_num_groups=8",
                  "autoencoder.num_res_blocks=[1,1,1]", "autoencoder.num_splits=2",
                  "ldm.unet.num_channels=[8,16,16,32]", "ldm.unet.num_head_channels=[0,0,8,8]",
                  "ldm.unet.norm_num_groups=8", "ldm.unet.num_res_blocks=1", "data.num_workers=0", "fast_dev_run=true",
                  "device.device=cpu"]


def test_the_fine_tuning_recipe_starts_from_files_in_maisis_release_layout(tmp_path):
    """The recipe with its weight paths pointed at files laid out as NV-Generate-CT's (autoencoder_v1.pt a plain
    state dict, diff_unet_3d_rflow-ct.pt a dict holding unet_state_dict and scale_factor) for its networks, shrunk:
    validate passes, and train-ldm fine-tunes the file's UNet over the file's VAE on CT volumes at the recipe's
    spacing, with MAISI's spacing and modality inputs."""
    datalist = ct_datalist(tmp_path / "data")
    models = tmp_path / "models"
    overrides = [*SMALL_FINETUNE, f"data.datalist={datalist}", f"output.output_dir={tmp_path / 'runs'}",
                 f"ldm.autoencoder_checkpoint={models / 'autoencoder_v1.pt'}",
                 f"ldm.training.init_checkpoint={models / 'diff_unet_3d_rflow-ct.pt'}"]
    config = load_config(FINETUNE, overrides)
    torch.manual_seed(0)
    vae = build_autoencoder(config.autoencoder)
    unet = build_unet(config.ldm, config.autoencoder.latent_channels, 3,
                      ConditionEncoder.placeholder(config).unet_arguments())
    assert type(vae) is AutoencoderKlMaisi and type(unet) is DiffusionModelUNetMaisi
    models.mkdir()
    torch.save(vae.state_dict(), models / "autoencoder_v1.pt")
    torch.save({"epoch": 1000, "loss": 0.1, "num_train_timesteps": 1000, "scale_factor": torch.tensor(1.25),
                "unet_state_dict": unet.state_dict()}, models / "diff_unet_3d_rflow-ct.pt")
    argv = ["--config", str(FINETUNE)] + [part for override in overrides for part in ("--set", override)]
    assert validate.main(argv) == 0

    assert train_ldm.main(argv) == 0
    (run,) = (tmp_path / "runs").glob("ldm-*")
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["latent_shape"] == [4, 8, 8, 8] and state["step"] >= 1
    assert state["autoencoder_checkpoint"] == str(models / "autoencoder_v1.pt")
    maisi = state["conditioning"]["maisi"]
    assert maisi["spacing"] and maisi["modality"] == "ct" and maisi["modalities"]["ct"] == 1
    # The file's weights after one step at lr 1e-5 (Adam moves each weight by about the LR).
    for key, value in unet.state_dict().items():
        assert torch.allclose(state["unet"][key], value, atol=1e-4), key
    # Trained at the recipe's spacing, which the spacing input and the validation sample's affine carry.
    assert voxel_spacing(torch.as_tensor(state["affine"])).tolist() == pytest.approx([1.7, 1.7, 2.0])
    (sample,) = (run / "samples").glob("sample-*.nii.gz")
    assert nib.load(sample).header.get_zooms() == pytest.approx((1.7, 1.7, 2.0))
