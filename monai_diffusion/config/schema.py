"""The typed configuration schema: one section per stage of the pipeline.

Every field carries its documentation (``description``) and default, so the YAML
presets, ``monai-diffusion validate`` and this file tell the same story. The three
stages' training sections share one declaration (:class:`TrainingConfig`). Unknown
keys are rejected (``extra="forbid"``); cross-field rules live in
:mod:`monai_diffusion.config.rules` and run before any data is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# A level's factor: one int for every axis, or one int per axis.
Factor = Union[int, list[int]]
# A channel of a multi-channel file, 0-based.
ChannelIndex = Annotated[int, Field(ge=0)]
# device.mixed_precision's values, the ones engine/precision.py resolves; a stage's own setting adds None (= the device
# setting).
MixedPrecision = Union[bool, Literal["fp16", "bf16", "fp32", "no"]]
LRSchedule = Literal["constant", "cosine", "multistep", "polynomial"]


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, assignment is validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- data


class IntensityConfig(Section):
    """``data.intensity``: how raw intensities are mapped to the [b_min, b_max] range the networks see (per item
    class: ``data.intensity_by_class``)."""

    mode: Literal["percentile", "range", "none"] = Field(
        "percentile",
        description="How intensities are mapped to [b_min, b_max]: 'percentile' (robust to outliers, "
        "MRI), 'range' (fixed window, e.g. CT Hounsfield units), or 'none'.",
    )
    lower: float = Field(0.5, description="Lower percentile (mode=percentile) or value (mode=range).")
    upper: float = Field(99.5, description="Upper percentile (mode=percentile) or value (mode=range).")
    b_min: float = Field(0.0, description="Output value for `lower`.")
    b_max: float = Field(1.0, description="Output value for `upper`.")
    clip: bool = Field(True, description="Clip to [b_min, b_max] after scaling.")


class AugmentConfig(Section):
    """``data.augment``: random flips and affine transforms of the training volumes (validation sees none)."""

    flip_prob: float = Field(0.0, ge=0, le=1, description="Probability of a random flip on each axis.")
    affine_prob: float = Field(0.0, ge=0, le=1, description="Probability of a random affine (rotate + scale).")
    rotate_range: float = Field(0.1, ge=0, description="Max rotation (radians) per axis for the random affine.")
    scale_range: float = Field(0.1, ge=0, description="Max relative scaling per axis for the random affine.")


class DemoConfig(Section):
    """``data.demo``: the built-in demo set (``data.source: demo``), derived from the MNI152 template, no download."""

    num_volumes: int = Field(
        24, ge=2, description="How many volumes the demo set derives from the MNI152 template."
    )
    conditional: bool = Field(
        False,
        description="true: the conditional demo set instead, a separate set of files: each brain scaled by a known "
        "`brain_scale` (0.8-1.2, its volume by 0.5-1.7x) and given a tissue label map `label` (0 outside the brain, "
        "1 CSF, 2 grey matter, 3 white matter, from nilearn's MNI152 templates), both in its datalist, for "
        "data.conditions and train-controlnet. false: the plain demo brains.",
    )
    cache_dir: Path | None = Field(
        None,
        description="Where the demo NIfTI files are written once and reused. "
        "Default: ~/.cache/monai_diffusion/demo.",
    )


class ConditionConfig(Section):
    """One entry of ``data.conditions``: a datalist field the LDM is conditioned on, and how it is encoded."""

    name: str = Field(description="The datalist field holding the value (a JSON key or CSV column), e.g. `age`.")
    type: Literal["continuous", "categorical"] = Field(
        "continuous",
        description="'continuous': a number, normalised with the mean and standard deviation of the training split "
        "(kept in the checkpoint); 'categorical': a label from a vocabulary (kept in the checkpoint).",
    )
    categories: list[str] | None = Field(
        None,
        description="categorical: the vocabulary, in a fixed order (None: the values met in the training split, "
        "sorted). A value outside it is an error.",
    )


class DataConfig(Section):
    """``data``: where the volumes come from; how each is resampled, reoriented, scaled and cropped to one size;
    how they are cached and loaded; and the fields read with them (covariates, label maps)."""

    source: Literal["demo", "folder", "datalist"] = Field(
        "demo",
        description="'demo': built-in set derived from the MNI152 template (no download); 'folder': every "
        "file in `data_dir` matching `glob`; 'datalist': a JSON (MONAI decathlon style) or CSV file.",
    )
    data_dir: Path | None = Field(None, description="Folder of NIfTI volumes (source=folder).")
    glob: str = Field("*.nii*", description="File pattern inside `data_dir`.")
    datalist: Path | None = Field(
        None,
        description="JSON with 'training'/'validation' lists of {'image': path, ...}, or CSV with columns "
        "image[,split,...]; relative paths are taken from the datalist's folder. An entry's other text or number "
        "fields stay with it (e.g. `class` for data.intensity_by_class).",
    )
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="Validation share when the source gives no split (fixed seed)."
    )
    voxel_size: list[int] = Field(
        [64, 64, 64],
        description="Spatial size every volume is cropped/padded to (after resampling). Must be divisible "
        "by the autoencoder's total downsampling factor on each axis.",
    )
    spacing: list[float] | None = Field(
        None, description="Resample to this voxel spacing in mm (None keeps the file's spacing)."
    )
    orientation: str = Field("RAS", description="Orientation code every volume is reoriented to.")
    channel: ChannelIndex | list[ChannelIndex] | None = Field(
        None,
        description="Channels kept from multi-channel files, 0-based, selected right after loading: one index "
        "(e.g. 0 = FLAIR in MSD BraTS, MONAI's tutorial `channel` and MAISI's `select_channel`) or a list; None "
        "keeps every channel. The kept count must equal autoencoder.in_channels.",
    )
    intensity: IntensityConfig = Field(default_factory=IntensityConfig)
    intensity_by_class: dict[str, IntensityConfig] = Field(
        default_factory=dict,
        description="Intensity settings per item class, chosen by a datalist entry's `class` field (MAISI's "
        "convention, e.g. {ct: a -1000..1000 HU range, mri: percentiles}); an item of another class or none uses "
        "`intensity`. Every class keeps `intensity`'s b_min and b_max (one output range for padding, metrics and "
        "generated volumes).",
    )
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    cache: Literal["none", "memory", "disk", "preprocessed"] = Field(
        "memory",
        description="'memory': MONAI CacheDataset (fast, RAM); 'disk': PersistentDataset in `cache_dir` "
        "(survives restarts); 'preprocessed': the deterministic transforms (load, resample, intensity, pad/crop) run "
        "once per volume before training (num_workers processes per GPU) and stored uncompressed in `cache_dir`, read "
        "memory-mapped, so a random patch reads only its own pages (for data sets larger than RAM); 'none': load and "
        "transform every time.",
    )
    cache_dir: Path | None = Field(
        None, description="Folder for cache=disk and cache=preprocessed (default: <output_dir>/cache)."
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    on_bad_file: Literal["error", "skip"] = Field(
        "error", description="An unreadable/invalid volume stops the run ('error') or is logged and left out."
    )
    demo: DemoConfig = Field(default_factory=DemoConfig)
    conditions: list[ConditionConfig] = Field(
        default_factory=list,
        description="Covariates the LDM is conditioned on, each read from an entry's datalist field (source "
        "'datalist', or the conditional demo set), e.g. [{name: age}, {name: sex, type: categorical}]. "
        "Empty: unconditional.",
    )
    mask_key: str | None = Field(
        None,
        description="The datalist field naming each volume's label map (a NIfTI file on the image's voxel grid, "
        "integer labels 0..controlnet.num_labels-1; relative paths from the datalist's folder) that "
        "train-controlnet learns to follow, e.g. `label`. None: no label maps.",
    )


# ------------------------------------------------------------ training (every stage)


class TrainingConfig(Section):
    """How a stage trains: micro-batch and accumulation, when to stop, precision, the AdamW optimizer and its LR
    schedule, gradient clipping, the non-finite guard, and how often to validate and keep checkpoints.

    Declared once for the three stages (``autoencoder.training``, ``ldm.training``, ``controlnet.training``); each
    stage's section overrides the defaults that differ for it and adds its own settings. The defaults here are the
    autoencoder's. A field keeps its type and bounds in every stage.
    """

    batch_size: int = Field(
        1, ge=1, description="Items per micro-batch, per GPU under DDP: volumes (or patches) for the autoencoder, "
        "latents for the LDM and the ControlNet."
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="Micro-batches per optimizer step; effective batch = batch_size x this x GPUs."
    )
    max_epochs: int | None = Field(100, ge=1, description="Stop after this many epochs (None: no bound).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (None: no bound).")
    mixed_precision: MixedPrecision | None = Field(
        None, description="This stage's precision, as device.mixed_precision (None: device.mixed_precision)."
    )
    lr: float = Field(
        1e-4, gt=0, description="Learning rate of the network the stage trains (the autoencoder's generator, the "
        "UNet, the ControlNet)."
    )
    scale_lr_by_world_size: bool = Field(
        False, description="Multiply the learning rates (lr, and the autoencoder's disc_lr) by the number of "
        "processes (GPUs), as MONAI's tutorial does."
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW eps (PyTorch's default 1e-8; MAISI uses 1e-6 under fp16).")
    warmup_steps: int = Field(
        0, ge=0, description="Linear LR warm-up, in optimizer steps (in epochs with lr_schedule_interval: epoch)."
    )
    lr_schedule: LRSchedule = Field(
        "constant",
        description="LR after warm-up: 'constant'; 'cosine' decays to 0 at the end (needs max_steps, or max_epochs "
        "with lr_schedule_interval: epoch); 'multistep' is torch MultiStepLR(lr_milestones, lr_gamma); "
        "'polynomial' is torch PolynomialLR(power=lr_power), 0 at the run's last step (or epoch). "
        "'multistep' and 'polynomial' take no warm-up. (The LDM of MONAI's tutorial and of the BraTS bundle: "
        "'multistep' [100, 1000] per epoch; MAISI's: 'polynomial' with power 2.)",
    )
    lr_schedule_interval: Literal["step", "epoch"] = Field(
        "step",
        description="When the LR schedule advances: after every optimizer step, or after every epoch (PyTorch's "
        "convention for MultiStepLR milestones counted in epochs).",
    )
    lr_milestones: list[int] = Field(
        [], description="lr_schedule 'multistep': where the LR is multiplied by lr_gamma, in schedule steps."
    )
    lr_gamma: float = Field(0.1, gt=0, description="lr_schedule 'multistep': the factor at each milestone.")
    lr_power: float = Field(1.0, gt=0, description="lr_schedule 'polynomial': the decay's power.")
    grad_clip: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this (None: off).")
    max_nonfinite_steps: int = Field(
        20, ge=1, description="Stop with an error after this many consecutive non-finite losses."
    )
    val_every_n_epochs: int = Field(
        1, ge=1, description="Validate every N epochs (the autoencoder: L1/PSNR/SSIM and a PNG panel)."
    )
    keep_last_checkpoints: int = Field(
        2, ge=1, description="How many step checkpoints to keep (plus last.pt, and the autoencoder's best.pt)."
    )
    init_checkpoint: Path | None = Field(
        None,
        description="Weights the stage's network (the autoencoder, the UNet, the ControlNet) starts from instead of "
        "its initial ones, read before the first step: a checkpoint or run folder of this tool (its network; an LDM's "
        "or ControlNet's EMA weights when it kept them), a plain MONAI state dict (today's key names or MONAI "
        "Generative's), or a released MAISI / model-zoo file (a dict holding unet_state_dict or "
        "controlnet_state_dict). Unlike --resume, the optimizer, LR schedule and step count start fresh (and the "
        "autoencoder's discriminator from its initial weights); a resumed run continues its checkpoint and does not "
        "read this. None: start as built.",
    )
    init_strict: bool = Field(
        True,
        description="init_checkpoint must fit the network exactly: every tensor by name and shape, both ways, or the "
        "run stops listing the first differences with both shapes. false: load the tensors that fit, keep the rest "
        "as built, and log what was left out of the file and what the file lacked.",
    )


# ---------------------------------------------------------------- autoencoder


class AutoencoderTrainingConfig(TrainingConfig):
    """The autoencoder's training: the shared settings (with their defaults), the volume or patches it trains on,
    and its loss: L1 + KL, the optional structural and perceptual terms, and the patch discriminator's adversarial
    term with its own optimizer."""

    voxel_size: list[int] | None = Field(
        None,
        description="Volume size of the autoencoder stage (None: data.voxel_size, which the LDM trains and "
        "generates at). MONAI's 3D LDM tutorial, e.g., trains its autoencoder on 112x128x80 crops of whole volumes "
        "and its LDM on a 144x176x112 centre crop.",
    )
    patch_size: list[int] | None = Field(
        None,
        description="Train on random crops of this size (MONAI RandSpatialCropd) of each volume; validation (and "
        "`evaluate`) reconstructs whole volumes window by window at this size (MONAI sliding window). None: train on "
        "whole volumes. Divisible by the total downsampling factor. The LDM still trains on whole-volume latents.",
    )
    patch_foreground_ratio: float | None = Field(
        None, ge=0, le=1,
        description="With patch_size: the share of patches centred on a foreground voxel, the rest on background "
        "(MONAI RandCropByPosNegLabeld; foreground: any channel above patch_foreground_threshold after intensity "
        "scaling), so empty air does not dominate. None: uniform random crops.",
    )
    patch_foreground_threshold: float | None = Field(
        None,
        description="Scaled intensity above which a voxel counts as foreground for patch_foreground_ratio (None: "
        "data.intensity.b_min + 5% of [b_min, b_max]).",
    )
    disc_lr: float = Field(5e-4, gt=0, description="Discriminator learning rate.")
    kl_weight: float = Field(1e-6, ge=0, description="Weight of the KL term.")
    ssim_weight: float = Field(
        0.0, ge=0, description="Weight of a structural term (1 - SSIM or 1 - MS-SSIM, see ssim_type) added to L1; "
        "0 disables it. It rewards edges and local contrast that L1 alone blurs away early in training."
    )
    ssim_type: Literal["ssim", "ms_ssim"] = Field(
        "ssim", description="The structural term: 'ssim' (7-voxel window) or 'ms_ssim' (as many scales as the "
        "volume allows; costs more)."
    )
    adv_weight: float = Field(0.01, ge=0, description="Weight of the adversarial term (0 disables the discriminator).")
    adv_start_step: int = Field(
        0, ge=0, description="Optimizer step from which the discriminator trains and its loss counts."
    )
    disc_loss_weight: float | None = Field(
        None, ge=0,
        description="Weight of the discriminator's own loss in its backward pass (None: adv_weight, as MONAI's "
        "tutorial and the BraTS bundle scale it; MAISI leaves it unscaled: 1).",
    )
    disc_steps_per_generator_step: int = Field(
        1, ge=1,
        description="Discriminator optimizer steps per generator step, each on the same batch and reconstruction "
        "(the BraTS bundle's d_train_steps: 5). Above 1 needs gradient_accumulation_steps 1.",
    )
    disc_num_layers: int = Field(3, ge=1, description="PatchDiscriminator layers.")
    disc_channels: int = Field(32, ge=1, description="PatchDiscriminator channels of the first layer.")
    use_perceptual_loss: bool = Field(
        False, description="Add MONAI PerceptualLoss. Its pretrained network is downloaded into torch hub's "
        "folder ($TORCH_HOME/hub) on first use, or read offline from perceptual_weights."
    )
    perceptual_weight: float = Field(0.001, ge=0, description="Weight of the perceptual term.")
    perceptual_network: Literal[
        "squeeze", "alex", "vgg", "resnet50", "radimagenet_resnet50", "medicalnet_resnet10_23datasets",
        "medicalnet_resnet50_23datasets",
    ] = Field(
        "squeeze",
        description="Network behind the perceptual loss: 2D ImageNet networks on slices (squeeze/alex/vgg, need "
        "`pip install lpips torchvision`), torchvision's ResNet50 on slices (`resnet50`, the BraTS bundle's; needs "
        "torchvision; its own weights from perceptual_pretrained_path), RadImageNet on slices, or 3D MedicalNet.",
    )
    perceptual_fake_3d_ratio: float = Field(
        0.25, gt=0, le=1,
        description="2D networks: share of the slices along each axis the loss is computed on (MONAI's "
        "fake_3d_ratio; the tutorial, bundle and MAISI use 0.2).",
    )
    perceptual_pretrained_path: Path | None = Field(
        None,
        description="perceptual_network 'resnet50': a weights file to load instead of torchvision's ImageNet "
        "weights (MONAI's pretrained_path; the bundle trained with its own RadImageNet-style weights).",
    )
    perceptual_state_dict_key: str | None = Field(
        None, description="perceptual_network 'resnet50': the key of the state dict inside that file (the bundle: "
        "'state_dict'); None: the file is the state dict."
    )
    perceptual_weights: Path | None = Field(
        None,
        description="A torch hub folder that already holds the perceptual network (copied from a connected "
        "machine): used offline, nothing is downloaded. None: torch hub's own folder, filled on first use.",
    )
    use_gradient_checkpointing: bool = Field(
        False, description="Recompute each network block in backward: less memory, ~20-40% more time."
    )
    offload_activations: bool = Field(
        False,
        description="Keep what the autoencoder's forward saves for backward in host memory (CUDA): with "
        "use_gradient_checkpointing each fused unit keeps a pinned host copy of its input and reads it back slab by "
        "slab in backward, everything else goes through torch.autograd.graph.save_on_cpu. Less GPU memory for whole "
        "large volumes, at the cost of copying every saved map to the host and back each step; no effect on CPU.",
    )


class AutoencoderConfig(Section):
    """``autoencoder``: the KL autoencoder that compresses a volume to the latent the LDM works in (our
    AutoencoderKL, MONAI's with per-level, per-axis downsampling factors; or MAISI's AutoencoderKlMaisi), and its
    ``training``. Keys of one architecture only are refused with the other."""

    architecture: Literal["ours", "maisi"] = Field(
        "ours",
        description="'ours': MONAI's AutoencoderKL with per-level, per-axis downsample_factors and the fused "
        "memory-saving path. 'maisi': MONAI's AutoencoderKlMaisi (monai.apps.generation.maisi), the network of MAISI's "
        "released VAE: every level but the last halves each axis (3 levels: 4x), 3D only, its convolutions optionally "
        "split into num_splits slabs along dim_split, its GroupNorm optionally in float16 (norm_float16); its "
        "use_checkpointing is autoencoder.training.use_gradient_checkpointing.",
    )
    num_channels: list[int] = Field(
        [32, 64, 64], description="Feature channels per level; more levels = more downsampling steps."
    )
    downsample_factors: list[Factor] | None = Field(
        None,
        description="Downsampling factor of each level (length len(num_channels)-1): an int, or one int per "
        "axis. None = 2 everywhere. Total factor = product, e.g. [4, 2] = 8x.",
    )
    latent_channels: int = Field(3, ge=1, description="Channels of the latent; raise (4-8) for strong downsampling.")
    num_res_blocks: int | list[int] = Field(1, description="Residual blocks per level (int or one per level).")
    attention_levels: list[bool] | None = Field(
        None, description="Self-attention at each level (None: none). Attention at full resolution is costly."
    )
    norm_num_groups: int = Field(16, ge=1, description="GroupNorm groups; every channel count must divide by it.")
    with_encoder_nonlocal_attn: bool = Field(True, description="Attention block in the encoder's mid-block.")
    with_decoder_nonlocal_attn: bool = Field(True, description="Attention block in the decoder's mid-block.")
    use_flash_attention: bool = Field(True, description="Attention through PyTorch SDPA (memory-efficient).")
    use_convtranspose: bool = Field(False, description="Upsample with transposed convs instead of nearest + conv.")
    include_fc: bool = Field(True, description="Output projection in the attention blocks (MONAI's include_fc).")
    use_combined_linear: bool = Field(
        False, description="One linear layer for the attention's q, k and v (MONAI's use_combined_linear)."
    )
    in_channels: int = Field(1, ge=1, description="Image channels.")
    residual_resampling: bool = Field(
        False, description="Add a parameter-free path through each resampling layer (block average down, nearest "
        "enlargement up; DC-AE's residual autoencoding): no new weights, faster early training at large factors. "
        "Changes what the weights compute, so it is part of the network's shape."
    )
    initial_sigma: float | None = Field(
        0.01, gt=0, description="Posterior standard deviation the encoder starts with (None: PyTorch's default init, "
        "about 1, as MONAI). Near 1 the decoder first sees mostly sampling noise, and Adam moves the log-variance only "
        "about lr per step, so short runs stay blurry; 0.01 lets the latent carry detail at once (+1.9 dB PSNR after "
        "300 steps on the demo brains, docs/autoencoder-recipe.md)."
    )
    num_splits: int = Field(
        1, ge=1,
        description="architecture 'maisi': MAISI's num_splits: each convolution and upsampling runs on this many "
        "overlapping slabs of its input along dim_split, one at a time (less memory for large volumes, same weights "
        "and outputs; 1: whole). At every level the axis must divide into slabs of >= 4 voxels. MAISI's released "
        "network: 4 (inference configs 4-8, its VAE training 1).",
    )
    dim_split: int = Field(
        0, ge=0, le=2, description="architecture 'maisi': MAISI's dim_split, the spatial axis (0, 1 or 2) num_splits "
        "cuts along (its released network: 1)."
    )
    norm_float16: bool = Field(
        False,
        description="architecture 'maisi': MAISI's norm_float16: GroupNorm outputs in float16 (less memory). Needs "
        "fp16 autocast in every stage that runs the autoencoder (float32 or bf16 convolutions refuse float16 "
        "inputs). Its released network: true.",
    )
    save_mem: bool = Field(
        True,
        description="architecture 'maisi': MAISI's save_mem: empty the CUDA cache after every block (less reserved "
        "memory, slower steps; no effect on CPU). MAISI's default, true.",
    )
    training: AutoencoderTrainingConfig = Field(default_factory=AutoencoderTrainingConfig)


# Config keys of one autoencoder architecture only (refused with the other when changed from their defaults).
AUTOENCODER_OURS_ONLY = ("downsample_factors", "residual_resampling")
AUTOENCODER_MAISI_ONLY = ("num_splits", "dim_split", "norm_float16", "save_mem")


# ------------------------------------------------------------------------ LDM


# MAISI's modality vocabulary: the class label its DiffusionModelUNetMaisi and ControlNetMaisi take for each name
# (NVIDIA-Medtech/NV-Generate-CTMR configs/modality_mapping.json). 0 ('unknown') is also the null class of
# classifier-free guidance; MAISI's training maps a share of the ct_* codes to ct and the mri_* codes to mri.
MAISI_MODALITIES: dict[str, int] = {
    "unknown": 0, "ct": 1, "ct_wo_contrast": 2, "ct_contrast": 3, "mri": 8, "mri_t1": 9, "mri_t2": 10,
    "mri_flair": 11, "mri_pd": 12, "mri_dwi": 13, "mri_adc": 14, "mri_ssfp": 15, "mri_mra": 16, "mri_t1c": 17,
    "mri_swi": 20, "mri_t1_skull_stripped": 29, "mri_t2_skull_stripped": 30, "mri_flair_skull_stripped": 31,
    "mri_swi_skull_stripped": 32, "mri_mra_skull_stripped": 33,
}


class UNetConfig(Section):
    """``ldm.unet``: the diffusion UNet over the latent: MONAI's DiffusionModelUNet, or MAISI's
    DiffusionModelUNetMaisi, which also takes each volume's voxel spacing and its modality. Keys of MAISI's UNet
    only are refused with MONAI's."""

    architecture: Literal["monai", "maisi"] = Field(
        "monai",
        description="'monai': MONAI's DiffusionModelUNet. 'maisi': MONAI's DiffusionModelUNetMaisi "
        "(monai.apps.generation.maisi), the network of MAISI's released diffusion models, with its spacing input "
        "(include_spacing_input) and modality class (num_class_embeds; modality or modality_key); "
        "train-controlnet then builds ControlNetMaisi.",
    )
    num_channels: list[int] = Field([32, 64, 64], description="DiffusionModelUNet channels per level.")
    attention_levels: list[bool] = Field([False, True, True], description="Attention per UNet level.")
    num_res_blocks: int | list[int] = Field(1, description="Residual blocks per UNet level.")
    num_head_channels: int | list[int] = Field(16, description="Channels per attention head.")
    norm_num_groups: int = Field(16, ge=1, description="GroupNorm groups of the UNet.")
    include_fc: bool = Field(
        True, description="Output projection in the attention blocks (MONAI's include_fc; the BraTS bundle: false)."
    )
    use_combined_linear: bool = Field(
        False, description="One linear layer for the attention's q, k and v (MONAI's use_combined_linear)."
    )
    resblock_updown: bool = Field(
        False, description="Down- and upsample with residual blocks instead of convolutions (MONAI's "
        "resblock_updown; MAISI: true)."
    )
    include_spacing_input: bool = Field(
        True,
        description="architecture 'maisi': MAISI's include_spacing_input: the UNet takes each volume's voxel spacing "
        "(mm per axis, from its affine after data.spacing's resampling; given to the network x100 as MAISI does), "
        "kept in the checkpoint with the training data's affine; `sample --spacing` sets it (default: the training "
        "data's).",
    )
    num_class_embeds: int | None = Field(
        128, ge=1,
        description="architecture 'maisi': MAISI's num_class_embeds: the size of the modality embedding (its released "
        "rflow networks: 128). The UNet then takes each volume's modality (modality or modality_key), as a code of "
        "MAISI's vocabulary (modality_mapping.json: unknown 0, ct 1, ..., mri 8, mri_t1 9, ...). None: no modality "
        "input.",
    )
    modality: str | None = Field(
        None,
        description="architecture 'maisi': the modality of every training volume, a name of MAISI's vocabulary (e.g. "
        "`ct`, `mri_t1`); also `sample`'s default. Give this or modality_key.",
    )
    modality_key: str | None = Field(
        None,
        description="architecture 'maisi': the datalist field holding each volume's modality (a name of MAISI's "
        "vocabulary), e.g. `modality` or MAISI's `class`; `sample` defaults to the most frequent one of the training "
        "split (kept in the checkpoint). Give this or modality.",
    )


# ldm.unet keys of MAISI's UNet only (refused with architecture 'monai' when changed from their defaults).
UNET_MAISI_ONLY = ("include_spacing_input", "num_class_embeds", "modality", "modality_key")


class SchedulerConfig(Section):
    """``ldm.scheduler``: the noise scheduler the LDM trains with (DDPM, DDIM or rectified flow) and its
    schedule; the rflow-only keys are refused with another type."""

    type: Literal["ddpm", "ddim", "rflow"] = Field("ddpm", description="Noise scheduler used for training.")
    num_train_timesteps: int = Field(1000, ge=2, description="Diffusion steps at training time.")
    schedule: Literal["linear_beta", "scaled_linear_beta", "sigmoid_beta", "cosine"] = Field(
        "scaled_linear_beta", description="Beta schedule (DDPM/DDIM)."
    )
    beta_start: float = Field(0.0015, gt=0, description="First beta (DDPM/DDIM).")
    beta_end: float = Field(0.0195, gt=0, description="Last beta (DDPM/DDIM).")
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = Field(
        "epsilon", description="What the UNet predicts (DDPM/DDIM); rflow always predicts velocity."
    )
    clip_sample: bool = Field(
        False, description="DDPM/DDIM: clip each denoised estimate to [-1, 1] while sampling (MONAI's default and the "
        "tutorial's; off here because scaled latents are not bounded)."
    )
    use_discrete_timesteps: bool = Field(
        True, description="rflow: integer training timesteps (false: continuous, MAISI's)."
    )
    sample_method: Literal["logit-normal", "uniform"] = Field(
        "logit-normal", description="rflow: distribution of the training timesteps (MAISI: uniform)."
    )
    loc: float = Field(0.0, description="rflow, sample_method logit-normal: the distribution's location.")
    scale: float = Field(
        1.0, gt=0, description="rflow, sample_method logit-normal: the distribution's scale (MONAI reads it only for "
        "logit-normal; MAISI sets 1.4 beside uniform)."
    )
    use_timestep_transform: bool = Field(
        True, description="rflow: shift timesteps by the latent's size relative to base_img_size_numel."
    )
    transform_scale: float = Field(1.0, gt=0, description="rflow: the timestep transform's scale.")
    base_img_size_numel: int | None = Field(
        None, ge=1, description="rflow: latent voxels at which the timestep transform is neutral (None: the "
        "training latent's own, so training is unshifted; MONAI's and MAISI's default: 32768 = 32^3)."
    )


class LDMTrainingConfig(TrainingConfig):
    """The LDM's training: the UNet learns to denoise the autoencoder's scaled latents. Besides the shared settings
    (a larger micro-batch, a longer run and sparser validation than the autoencoder's: a latent is small, and a
    validation sample is a whole denoising loop), its loss, EMA, latent cache and scale factor."""

    batch_size: int = Field(2, ge=1, description="Latents per micro-batch, per GPU under DDP.")
    max_epochs: int | None = Field(200, ge=1, description="Stop after this many epochs (None: no bound).")
    val_every_n_epochs: int = Field(
        10, ge=1, description="Sample a validation volume (a whole denoising loop) every N epochs."
    )
    loss: Literal["mse", "l1"] = Field(
        "mse", description="Regression loss on the scheduler's target: 'mse' (the tutorial's, the bundle's) or 'l1' "
        "(MAISI's)."
    )
    ema_decay: float | None = Field(
        0.999, ge=0, lt=1, description="EMA of the trained weights (used for samples and saved); None: off. Averages "
        "about 1/(1-decay) steps: keep that well below the run length (0.999 suits 10k+ steps)."
    )
    cache_latents: bool = Field(
        True, description="Encode each volume once (mu, sigma) and train from the cache; false: encode on the fly."
    )
    scale_factor_volumes: int = Field(
        8, ge=1, description="Training volumes used once to compute the latent scale factor (1/std)."
    )
    scale_factor: float | None = Field(
        None, gt=0,
        description="The latent scale factor, as given (None: 1/std of scale_factor_volumes training latents, computed "
        "once). When fine-tuning a released UNet (init_checkpoint) on the latents of the autoencoder it was trained "
        "with, give it the factor it was trained with, which train-ldm logs when the file carries one (MAISI's "
        "diffusion files do). A resumed run keeps its checkpoint's.",
    )


class ConditioningConfig(Section):
    """``ldm.conditioning``: how a conditional LDM takes ``data.conditions``, and how often it trains without
    them (classifier-free guidance)."""

    categorical_via: Literal["cross_attention", "class_embedding"] = Field(
        "cross_attention",
        description="How the UNet takes categorical data.conditions: 'cross_attention' (one-hot in the context "
        "vector its attention levels and mid-block attend to, with the continuous values) or 'class_embedding' "
        "(MONAI's num_class_embeds: one class per combination of categories, added to the timestep embedding). "
        "Continuous values always go through cross-attention.",
    )
    dropout: float = Field(
        0.1, ge=0, lt=1,
        description="Classifier-free guidance: probability that a training sample's conditions are all replaced by "
        "the null condition, so the same UNet also learns the unconditional model that guidance extrapolates "
        "from. 0: no guidance possible at sampling.",
    )


class SamplingConfig(Section):
    """``ldm.sampling``: how volumes are generated (``sample`` and the validation samples): sampler, steps,
    guidance, and tiled decoding."""

    scheduler: Literal["ddpm", "ddim", "rflow"] | None = Field(
        None, description="Sampler (None: the training scheduler; ddim needs a ddpm/ddim-trained model)."
    )
    guidance_scale: float = Field(
        1.0, ge=0,
        description="Classifier-free guidance scale w of a conditional LDM: prediction = unconditional + w "
        "(conditional - unconditional); 1: the plain conditional model, above 1: conditions followed more "
        "strongly (one extra UNet pass per step). `sample --guidance` overrides it.",
    )
    num_inference_steps: int = Field(50, ge=1, description="Denoising steps.")
    num_samples: int = Field(1, ge=1, description="Volumes to generate.")
    tiled_decode: bool = Field(False, description="Decode latents through a sliding window (less memory).")
    tile_size: list[int] | None = Field(None, description="Latent window size for tiled decoding (None: half).")
    tile_overlap: float = Field(0.25, ge=0, lt=1, description="Overlap between decode windows.")


class LDMConfig(Section):
    """``ldm``: the latent diffusion model: the trained autoencoder it works over, its UNet, noise scheduler,
    conditioning, ``training`` and sampling."""

    autoencoder_checkpoint: Path | None = Field(
        None, description="Trained autoencoder checkpoint (None: the newest run's best/last checkpoint)."
    )
    unet: UNetConfig = Field(default_factory=UNetConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    conditioning: ConditioningConfig = Field(default_factory=ConditioningConfig)
    training: LDMTrainingConfig = Field(default_factory=LDMTrainingConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


# ------------------------------------------------------------------ ControlNet


class ControlNetTrainingConfig(LDMTrainingConfig):
    """The ControlNet's training: the LDM's settings (its latent cache, precision, accumulation, schedules, EMA),
    applied to the ControlNet while the LDM stays frozen. ``scale_factor_volumes`` and ``scale_factor`` are not read:
    the latents are scaled by the LDM's own factor. Without ``init_checkpoint`` the ControlNet starts as a copy of
    the LDM's UNet."""


class ControlNetConfig(Section):
    """``controlnet``: the optional ControlNet that steers the frozen LDM with label maps (``data.mask_key``)."""

    ldm_checkpoint: Path | None = Field(
        None, description="The trained LDM the ControlNet steers, frozen (a checkpoint or run folder; None: the "
        "newest <output_dir>/ldm-*/checkpoints/last.pt). Its EMA weights are used when it has them."
    )
    num_labels: int = Field(
        4, ge=2, description="Label values in the masks (data.mask_key): 0..num_labels-1, 0 = background. The "
        "ControlNet sees one channel per other label (its share of each control voxel)."
    )
    conditioning_embedding_num_channels: list[int] = Field(
        [16, 32],
        description="Channels of MONAI's ControlNet conditioning embedding; each entry after the first halves the "
        "mask's resolution, so the mask is fed at the latent size x 2^(len - 1) (pooled from the image grid: "
        "2^(len - 1) must divide the autoencoder's total factor on every axis).",
    )
    conditioning_scale: float = Field(
        1.0, ge=0, description="Weight of the ControlNet's residuals when sampling (MONAI's conditioning_scale; "
        "training uses 1)."
    )
    training: ControlNetTrainingConfig = Field(default_factory=ControlNetTrainingConfig)


# ----------------------------------------------------------------- run-level


class DeviceConfig(Section):
    """``device``: where and how the networks run: device, mixed precision, cuDNN autotuning, torch.compile."""

    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks CUDA when available.")
    mixed_precision: MixedPrecision = Field(
        False,
        description="true = fp16 on CUDA (bf16 on CPU, logged); 'fp16' / 'bf16' explicit; false / 'no' / 'fp32' = "
        "fp32.",
    )
    cudnn_benchmark: bool = Field(True, description="Let cuDNN pick the fastest conv algorithms (CUDA).")
    compile: bool = Field(
        False,
        description="Compile the networks a command runs with torch.compile: the trained autoencoder and "
        "discriminator, or UNet (over DDP under torchrun), and sample's UNet and decoder. Checkpoints hold the plain "
        "networks either way, so a run may resume with or without it. The first steps are slow (compiling: seconds "
        "to minutes); with use_gradient_checkpointing the memory-saving encoder and decoder run uncompiled inside the "
        "compiled network. Needs a C++ compiler on CPU.",
    )
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = Field(
        "default",
        description="torch.compile's mode with device.compile: 'default'; 'reduce-overhead' (CUDA graphs: less "
        "launch overhead for small latents, more memory); 'max-autotune' (searches kernels: longer compiles).",
    )


class OutputConfig(Section):
    """``output``: where a run writes (checkpoints, logs, the resolved config), how often it logs scalars and which
    experiment trackers receive them."""

    output_dir: Path = Field(Path("runs"), description="Every run writes to <output_dir>/<run_name>.")
    run_name: str | None = Field(None, description="Run folder name (None: <command>-<date>-<time>).")
    log_every_n_steps: int = Field(
        10, ge=1, description="Interval of the training scalars (every logger), in optimizer steps."
    )
    loggers: list[Literal["tensorboard", "mlflow"]] = Field(
        ["tensorboard"],
        description="Where a training run logs its scalars and panels: 'tensorboard' (event files in "
        "<run>/tensorboard) and/or 'mlflow' (MLflow tracking, as MONAI's bundles log: the resolved config as "
        "parameters, every scalar, the panels as artifacts, the final checkpoint's path as a tag; needs `pip install "
        "'monai-diffusion[mlflow]'`). Empty: console and the run folder's files only.",
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="With loggers 'mlflow': where the runs go, an MLflow tracking URI (a server "
        "'http://host:5000', 'sqlite:///mlflow.db', 'file:///path/mlruns'). None: a file store in <run>/mlruns.",
    )
    mlflow_experiment_name: str | None = Field(
        None,
        description="With loggers 'mlflow': the MLflow experiment (created when missing). None: the command, "
        "e.g. 'train-autoencoder'.",
    )


class Config(Section):
    """The whole run: data -> autoencoder -> LDM (-> ControlNet), plus device, output and seed."""

    data: DataConfig = Field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = Field(default_factory=AutoencoderConfig)
    ldm: LDMConfig = Field(default_factory=LDMConfig)
    controlnet: ControlNetConfig = Field(default_factory=ControlNetConfig)
    device: DeviceConfig = Field(default_factory=DeviceConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    seed: int = Field(42, description="Seed for data splits, weights and sampling.")
    fast_dev_run: bool = Field(
        False, description="Quick check: 2 training and 1 validation batch per epoch, 1 epoch, no stale state."
    )
