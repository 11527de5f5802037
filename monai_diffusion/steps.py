"""The training step of each stage, defined once: the three training commands run it, benchmark and plan measure it.

A stage (autoencoder, LDM, ControlNet) is built from the config by one function (the networks, the loss with its
weights, optimizers, scalers, LR schedules, EMA) and answers the same few calls: ``micro_step`` (forward and
backward of one batch under the run's precision and gradient accumulation), ``update`` (the optimizer step after
the last micro-batch), ``epoch_end``, ``state_dict`` / ``load_state_dict`` for what its checkpoint holds, and
``load_init`` for a fresh run's starting weights (``<stage>.training.init_checkpoint``).
:func:`train_step` runs k micro-batches, then the update: the engine's loop
(:func:`monai_diffusion.engine.loop.train_epochs`) calls it with real data, the memory harness
(:mod:`monai_diffusion.memory.probe`) with random data of the same shape. What is planned and benchmarked is
therefore what trains.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss, PerceptualLoss
from monai.networks.nets import ControlNet, DiffusionModelUNet, PatchDiscriminator
from monai.networks.utils import copy_model_state
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel

from monai_diffusion.conditioning import ConditionEncoder, Conditioning, control_input, control_size, unet_output
from monai_diffusion.config.schema import (
    AutoencoderTrainingConfig,
    Config,
    ControlNetTrainingConfig,
    DeviceConfig,
    LDMTrainingConfig,
    TrainingConfig,
)
from monai_diffusion.diffusion import diffusion_loss
from monai_diffusion.engine.distributed import DistInfo, gradient_sync, wrap_ddp
from monai_diffusion.engine.ema import build_ema
from monai_diffusion.engine.optim import StepResult, build_lr_scheduler, build_optimizer, optimizer_step
from monai_diffusion.engine.precision import Precision
from monai_diffusion.engine.weights import FileWeights, init_network
from monai_diffusion.latents import LatentRecord
from monai_diffusion.losses import (
    StructuralLoss,
    adversarial_active,
    build_adversarial_loss,
    build_perceptual_loss,
    kl_loss,
)
from monai_diffusion.networks.builders import (
    build_autoencoder,
    build_controlnet,
    build_discriminator,
    build_scheduler,
    build_unet,
)
from monai_diffusion.networks.memory_saving import offload_saved_maps

__all__ = [
    "AutoencoderTraining",
    "ControlNetTraining",
    "ControlRecord",
    "LDMTraining",
    "autoencoder_epoch_end",
    "autoencoder_micro_step",
    "autoencoder_update",
    "build_autoencoder_training",
    "build_controlnet_training",
    "build_ldm_training",
    "controlnet_control",
    "controlnet_epoch_end",
    "controlnet_micro_step",
    "controlnet_update",
    "frozen",
    "ldm_epoch_end",
    "ldm_latents",
    "ldm_micro_step",
    "ldm_update",
    "training_model",
]

logger = logging.getLogger("monai_diffusion")


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """No gradients into ``module`` (the discriminator while the generator learns to fool it)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


def training_model(network: torch.nn.Module, device: DeviceConfig, dist: DistInfo | None = None) -> torch.nn.Module:
    """What a training forward runs through: ``network``, DDP-wrapped under several processes, then compiled with
    ``device.compile`` (``torch.compile`` over DDP, PyTorch's order for the two: its DDP optimizer splits the graph
    at the gradient buckets, so the all-reduce still overlaps the backward).

    The result shares the network's parameters. Save, average (EMA) and validate the network itself: its state dict
    has no wrapper prefixes (``module.``, ``_orig_mod.``), so a checkpoint loads with or without compile.

    Args:
        network: the bare network, on its device.
        device: the ``device`` section (``compile``, ``compile_mode``).
        dist: this process's place in the run (None: one process, as the memory probe runs).
    """
    model = wrap_ddp(network, dist) if dist is not None else network
    if device.compile:
        model = torch.compile(model, mode=device.compile_mode)
    return model


def _optimizer_and_schedule(
    parameters, lr: float, t: AutoencoderTrainingConfig | LDMTrainingConfig, max_steps: int | None,
    *, max_epochs: int | None, world_size: int,
) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """AdamW at ``lr`` (times the process count with ``scale_lr_by_world_size``) and the section's LR schedule, whose
    length is the run's optimizer steps, or its epochs for a schedule that advances per epoch."""
    optimizer = build_optimizer(parameters, lr * (world_size if t.scale_lr_by_world_size else 1), t.weight_decay,
                                eps=t.adam_eps)
    length = max_epochs if t.lr_schedule_interval == "epoch" else max_steps
    schedule = build_lr_scheduler(optimizer, t.warmup_steps, t.lr_schedule, length, milestones=t.lr_milestones,
                                  gamma=t.lr_gamma, power=t.lr_power)
    return optimizer, schedule


def _per_step(schedule: LRScheduler | None, t: AutoencoderTrainingConfig | LDMTrainingConfig) -> LRScheduler | None:
    """The schedule an optimizer step advances: None when it advances per epoch (``*_epoch_end`` does it)."""
    return schedule if t.lr_schedule_interval == "step" else None


def _init_weights(network: torch.nn.Module, t: TrainingConfig, section: str, ema: AveragedModel | None = None
                  ) -> FileWeights | None:
    """A fresh run's start: ``network`` from ``<section>.training.init_checkpoint`` (None: as built), and its EMA
    from the same weights."""
    if t.init_checkpoint is None:
        return None
    found = init_network(network, t.init_checkpoint, kind=section, strict=t.init_strict, section=f"{section}.training")
    if ema is not None:
        ema.module.load_state_dict(network.state_dict())
    return found


# ------------------------------------------------------------------------------------------------ autoencoder


@dataclass
class AutoencoderTraining:
    """What an autoencoder training step works on (:func:`build_autoencoder_training`).

    Attributes:
        training: the ``autoencoder.training`` section (loss weights, accumulation, gradient clipping).
        precision: autocast and gradient scalers of the run.
        autoencoder: the network being trained.
        discriminator: the PatchDiscriminator, None when ``adv_weight`` is 0.
        perceptual: the perceptual loss, None unless ``use_perceptual_loss``.
        structural: the SSIM / MS-SSIM term, None when ``ssim_weight`` is 0.
        adversarial_loss: the least-squares patch criterion.
        optimizer_g, scaler_g, lr_scheduler_g: the generator's (autoencoder's) optimizer, scaler and LR schedule.
        optimizer_d, scaler_d, lr_scheduler_d: the discriminator's, None without one.
        device: where the networks are (batches are moved there).
        discriminator_batch: (the discriminator module to run, reconstruction, images) of the last micro-batch,
            kept for the extra discriminator steps of ``disc_steps_per_generator_step`` > 1 until the update.
        model, disc_model: what the forwards run through (:meth:`wrap`; None: the networks themselves).
        best_val_l1: the lowest validation L1 so far (``best.pt``'s), kept in the checkpoint.
    """

    training: AutoencoderTrainingConfig
    precision: Precision
    autoencoder: torch.nn.Module
    discriminator: PatchDiscriminator | None
    perceptual: PerceptualLoss | None
    structural: StructuralLoss | None
    adversarial_loss: PatchAdversarialLoss
    optimizer_g: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    lr_scheduler_g: LRScheduler
    device: torch.device
    optimizer_d: torch.optim.Optimizer | None = None
    scaler_d: torch.amp.GradScaler | None = None
    lr_scheduler_d: LRScheduler | None = None
    discriminator_batch: tuple[torch.nn.Module, torch.Tensor, torch.Tensor] | None = None
    model: torch.nn.Module | None = None
    disc_model: torch.nn.Module | None = None
    best_val_l1: float = math.inf

    kind: ClassVar[str] = "autoencoder"
    section: ClassVar[str] = "autoencoder"

    @property
    def lr_scheduler(self) -> LRScheduler:
        """The generator's LR schedule (the one ``train/lr`` logs)."""
        return self.lr_scheduler_g

    @property
    def scaler(self) -> torch.amp.GradScaler:
        """The generator's gradient scaler (the one ``train/grad_scale`` logs)."""
        return self.scaler_g

    def wrap(self, device: DeviceConfig, dist: DistInfo | None = None) -> list[torch.nn.Module]:
        """Run forwards through :func:`training_model` of the autoencoder and the discriminator (DDP, compile);
        returns those modules (``cleanup_distributed`` releases them)."""
        self.model = training_model(self.autoencoder, device, dist)
        if self.discriminator is not None:
            self.disc_model = training_model(self.discriminator, device, dist)
        return [m for m in (self.model, self.disc_model) if m is not None]

    def networks(self) -> list[torch.nn.Module]:
        """The trained networks (their weights' digest goes into each checkpoint)."""
        return [m for m in (self.autoencoder, self.discriminator) if m is not None]

    def train(self) -> None:
        (self.model if self.model is not None else self.autoencoder).train()

    def micro_step(self, batch: dict, *, step: int, sync: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:func:`autoencoder_micro_step` on a batch of the loader (``batch["image"]``), adversarial from
        ``adv_start_step`` on. Returns the generator's loss and each term by name."""
        # A plain tensor: MetaTensor's metadata is not needed here, costs time per op and stops torch.compile.
        images = batch["image"].as_subclass(torch.Tensor).to(self.device, non_blocking=True)
        return autoencoder_micro_step(self, images, self._adversarial(step), sync, model=self.model,
                                      disc_model=self.disc_model)

    def update(self, step: int) -> StepResult:
        return autoencoder_update(self, self._adversarial(step))

    def epoch_end(self) -> None:
        autoencoder_epoch_end(self)

    def _adversarial(self, step: int) -> bool:
        return self.discriminator is not None and adversarial_active(step, self.training)

    def state_dict(self) -> dict[str, Any]:
        """The networks, optimizers, scalers and LR schedules (the discriminator's None without one) and the best
        validation L1 so far."""
        disc = self.discriminator is not None
        return {
            "autoencoder": self.autoencoder.state_dict(),
            "discriminator": self.discriminator.state_dict() if disc else None,
            "optimizer_g": self.optimizer_g.state_dict(),
            "optimizer_d": self.optimizer_d.state_dict() if disc else None,
            "scaler_g": self.scaler_g.state_dict(),
            "scaler_d": self.scaler_d.state_dict() if disc else None,
            "lr_scheduler_g": self.lr_scheduler_g.state_dict(),
            "lr_scheduler_d": self.lr_scheduler_d.state_dict() if disc else None,
            "best_val_l1": self.best_val_l1,
        }

    def load_init(self) -> None:
        """A fresh run's start: the autoencoder from ``autoencoder.training.init_checkpoint`` when set (the
        discriminator keeps its initial weights)."""
        _init_weights(self.autoencoder, self.training, self.section)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """What :meth:`state_dict` saved; a checkpoint without a discriminator leaves this one's fresh."""
        self.autoencoder.load_state_dict(state["autoencoder"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.lr_scheduler_g.load_state_dict(state["lr_scheduler_g"])
        self.scaler_g.load_state_dict(state["scaler_g"])
        if self.discriminator is not None and state.get("discriminator") is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.optimizer_d.load_state_dict(state["optimizer_d"])
            self.lr_scheduler_d.load_state_dict(state["lr_scheduler_d"])
            self.scaler_d.load_state_dict(state["scaler_d"])
        self.best_val_l1 = state.get("best_val_l1", self.best_val_l1)


def build_autoencoder_training(
    config: Config, device: torch.device, precision: Precision, *, max_steps: int | None,
    autoencoder: torch.nn.Module | None = None, max_epochs: int | None = None, world_size: int = 1,
    random_perceptual_weights: bool = False,
) -> AutoencoderTraining:
    """The autoencoder, discriminator, losses and optimizers of the config's autoencoder stage, on ``device``.

    Built in a fixed order (autoencoder first, then discriminator), so a seed gives the same initial weights.

    Args:
        config: the whole config (``autoencoder``, ``data.voxel_size``, ``data.intensity``).
        device: where the networks go.
        precision: the run's precision (its scalers are made here).
        max_steps: the run's optimizer steps (where a cosine or polynomial LR schedule ends).
        autoencoder: a network to train instead of ``build_autoencoder(config.autoencoder)`` (the benchmark
            compares MONAI's stock class and other slab sizes on the same step).
        max_epochs: the run's epochs (where a schedule advancing per epoch ends).
        world_size: the number of processes (``scale_lr_by_world_size``).
        random_perceptual_weights: the perceptual network with random weights (the memory probe, where the
            pretrained ones are not at hand: see ``build_perceptual_loss``).

    Raises:
        FileNotFoundError, ImportError: the perceptual network cannot be loaded (see ``build_perceptual_loss``).
    """
    t = config.autoencoder.training
    spatial_dims = len(config.data.voxel_size)
    autoencoder = (autoencoder if autoencoder is not None else build_autoencoder(config.autoencoder, spatial_dims))
    autoencoder = autoencoder.to(device)
    discriminator = build_discriminator(config.autoencoder, spatial_dims).to(device) if t.adv_weight > 0 else None
    perceptual = (build_perceptual_loss(t, spatial_dims, random_perceptual_weights).to(device).eval()
                  if t.use_perceptual_loss else None)
    value_range = config.data.intensity.b_max - config.data.intensity.b_min
    structural = StructuralLoss(t.ssim_type, spatial_dims, value_range) if t.ssim_weight > 0 else None
    optimizer_g, lr_scheduler_g = _optimizer_and_schedule(autoencoder.parameters(), t.lr, t, max_steps,
                                                          max_epochs=max_epochs, world_size=world_size)
    parts = AutoencoderTraining(
        training=t, precision=precision, autoencoder=autoencoder, discriminator=discriminator, perceptual=perceptual,
        structural=structural, adversarial_loss=build_adversarial_loss(), optimizer_g=optimizer_g,
        scaler_g=precision.make_scaler(), lr_scheduler_g=lr_scheduler_g, device=device,
    )
    if discriminator is not None:
        parts.optimizer_d, parts.lr_scheduler_d = _optimizer_and_schedule(
            discriminator.parameters(), t.disc_lr, t, max_steps, max_epochs=max_epochs, world_size=world_size)
        parts.scaler_d = precision.make_scaler()
    return parts


def _discriminator_backward(parts: AutoencoderTraining, disc_model: torch.nn.Module, fake: torch.Tensor,
                            real: torch.Tensor) -> torch.Tensor:
    """The discriminator's least-squares loss on a detached reconstruction and the images, backward weighted by
    ``disc_loss_weight`` (None: ``adv_weight``) and divided by the accumulation count; returns the unweighted loss."""
    t = parts.training
    with parts.precision.autocast():
        logits_fake = disc_model(fake)[-1]
        logits_real = disc_model(real)[-1]
    loss_d = 0.5 * (
        parts.adversarial_loss(logits_fake.float(), target_is_real=False, for_discriminator=True)
        + parts.adversarial_loss(logits_real.float(), target_is_real=True, for_discriminator=True)
    )
    weight = t.adv_weight if t.disc_loss_weight is None else t.disc_loss_weight
    parts.scaler_d.scale(weight * loss_d / t.gradient_accumulation_steps).backward()
    return loss_d


def autoencoder_micro_step(
    parts: AutoencoderTraining, images: torch.Tensor, adversarial: bool, sync: bool = True,
    *, model: torch.nn.Module | None = None, disc_model: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward of one micro-batch.

    The generator's loss is ``L1 + kl_weight KL [+ ssim_weight (1 - SSIM)] [+ perceptual_weight perceptual]
    [+ adv_weight adversarial]``; with ``adversarial`` the discriminator then learns from the (detached)
    reconstruction and the images, its loss weighted by ``disc_loss_weight`` (default ``adv_weight``). Both
    backward passes are divided by the accumulation count, so k micro-batches of b match one batch of k*b. With
    ``disc_steps_per_generator_step`` > 1 the reconstruction and images are kept for the update's extra steps.

    Args:
        parts: from :func:`build_autoencoder_training`.
        images: the micro-batch on the training device.
        adversarial: whether the adversarial terms count (``adversarial_active(step, training)``).
        sync: whether this micro-batch ends an optimizer step (DDP all-reduces the gradients only then).
        model, disc_model: the modules the forward runs through when they are DDP-wrapped (None: the networks).

    Returns:
        The generator's total loss and each term by name (``recon_l1``, ``kl``, ``ssim``/``ms_ssim``,
        ``perceptual``, ``gen_adv``, ``disc``), all still attached to the graph of this micro-batch.
    """
    t, precision = parts.training, parts.precision
    model = model if model is not None else parts.autoencoder
    disc_model = disc_model if disc_model is not None else parts.discriminator
    with gradient_sync(model, sync):
        with precision.autocast(), offload_saved_maps(t.offload_activations):
            reconstruction, z_mu, z_sigma = model(images)
        losses = {
            "recon_l1": F.l1_loss(reconstruction.float(), images.float()),
            "kl": kl_loss(z_mu, z_sigma),
        }
        loss_g = losses["recon_l1"] + t.kl_weight * losses["kl"]
        if parts.structural is not None:
            losses[t.ssim_type] = parts.structural(reconstruction, images)
            loss_g = loss_g + t.ssim_weight * losses[t.ssim_type]
        if parts.perceptual is not None:
            losses["perceptual"] = parts.perceptual(reconstruction.float(), images.float())
            loss_g = loss_g + t.perceptual_weight * losses["perceptual"]
        if adversarial:
            with frozen(parts.discriminator), precision.autocast():
                logits_fake = parts.discriminator(reconstruction)[-1]
            losses["gen_adv"] = parts.adversarial_loss(logits_fake.float(), target_is_real=True, for_discriminator=False)
            loss_g = loss_g + t.adv_weight * losses["gen_adv"]
        parts.scaler_g.scale(loss_g / t.gradient_accumulation_steps).backward()
    if adversarial:
        with gradient_sync(disc_model, sync):
            losses["disc"] = _discriminator_backward(parts, disc_model, reconstruction.detach(), images)
        if t.disc_steps_per_generator_step > 1:
            parts.discriminator_batch = (disc_model, reconstruction.detach(), images)
    return loss_g, losses


def autoencoder_update(parts: AutoencoderTraining, adversarial: bool) -> StepResult:
    """The optimizer step after the last micro-batch: the generator's, and the discriminator's when it trained, then
    its ``disc_steps_per_generator_step - 1`` extra steps on the kept batch (each a forward, backward and step; the
    LR schedule advances once per generator step)."""
    t = parts.training
    result = optimizer_step(parts.optimizer_g, parts.scaler_g, parts.autoencoder.parameters(), t.grad_clip,
                            lr_scheduler=_per_step(parts.lr_scheduler_g, t))
    if adversarial:
        optimizer_step(parts.optimizer_d, parts.scaler_d, parts.discriminator.parameters(), t.grad_clip,
                       lr_scheduler=_per_step(parts.lr_scheduler_d, t))
        if parts.discriminator_batch is not None:
            disc_model, fake, real = parts.discriminator_batch
            for _ in range(t.disc_steps_per_generator_step - 1):
                _discriminator_backward(parts, disc_model, fake, real)
                optimizer_step(parts.optimizer_d, parts.scaler_d, parts.discriminator.parameters(), t.grad_clip)
    parts.discriminator_batch = None
    return result


def autoencoder_epoch_end(parts: AutoencoderTraining) -> None:
    """At the end of a whole epoch: advance the LR schedules that count epochs (``lr_schedule_interval: epoch``)."""
    if parts.training.lr_schedule_interval == "epoch":
        for schedule in (parts.lr_scheduler_g, parts.lr_scheduler_d):
            if schedule is not None:
                schedule.step()


# ------------------------------------------------------------------------------------------------------- LDM


@dataclass
class LDMTraining:
    """What an LDM training step works on (:func:`build_ldm_training`).

    Attributes:
        training: the ``ldm.training`` section (accumulation, gradient clipping).
        precision: autocast and gradient scaler of the run.
        unet: the diffusion UNet being trained.
        scheduler: the noise scheduler of ``ldm.scheduler``.
        kind: ``ldm.scheduler.type`` (ddpm, ddim or rflow).
        optimizer, scaler, lr_scheduler: the UNet's optimizer, gradient scaler and LR schedule.
        ema: the EMA of the UNet's weights, None when ``ema_decay`` is None.
        device: where the UNet is (latents are made there).
        autoencoder: the frozen autoencoder that encodes image batches (None: batches hold cached posteriors).
        scale_factor: the latent scale factor.
        encoder: the conditions' encoder (None: unconditional).
        record: what the checkpoint keeps beside the networks (None: a step that is only measured).
        condition_dropout: ``ldm.conditioning.dropout``, the share of samples trained on the null condition.
        model: what the forward runs through (:meth:`wrap`; None: the UNet itself).
    """

    training: LDMTrainingConfig
    precision: Precision
    unet: DiffusionModelUNet
    scheduler: object
    kind: str
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr_scheduler: LRScheduler
    ema: AveragedModel | None
    device: torch.device
    autoencoder: torch.nn.Module | None = None
    scale_factor: float = 1.0
    encoder: ConditionEncoder | None = None
    record: LatentRecord | None = None
    condition_dropout: float = 0.0
    model: torch.nn.Module | None = None

    section: ClassVar[str] = "ldm"

    def wrap(self, device: DeviceConfig, dist: DistInfo | None = None) -> list[torch.nn.Module]:
        """Run the forward through :func:`training_model` of the UNet (DDP, compile); returns it."""
        self.model = training_model(self.unet, device, dist)
        return [self.model]

    def networks(self) -> list[torch.nn.Module]:
        return [self.unet]

    def train(self) -> None:
        (self.model if self.model is not None else self.unet).train()

    def micro_step(self, batch: dict, *, step: int, sync: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:func:`ldm_micro_step` on a batch of the loader: a fresh latent per volume (:func:`ldm_latents`) and the
        batch's conditions. Returns the loss, also as the one term ``loss``."""
        z = ldm_latents(batch, self.autoencoder, self.scale_factor, self.precision, device=self.device)
        condition = self.encoder.encode_batch(batch) if self.encoder is not None else None
        loss = ldm_micro_step(self, z, sync, self.model, condition=condition)
        return loss, {"loss": loss}

    def update(self, step: int) -> StepResult:
        return ldm_update(self)

    def epoch_end(self) -> None:
        ldm_epoch_end(self)

    def state_dict(self) -> dict[str, Any]:
        """The UNet, its EMA, optimizer, scaler and LR schedule, and the :class:`LatentRecord`."""
        return {**_network_state(self, "unet", self.unet), **self.record.state_dict()}

    def load_init(self) -> None:
        """A fresh run's start: the UNet (and its EMA) from ``ldm.training.init_checkpoint`` when set. A latent scale
        factor the file carries is logged beside the one this run scales by: ``ldm.training.scale_factor`` chooses."""
        found = _init_weights(self.unet, self.training, self.section, self.ema)
        if found is not None and found.scale_factor is not None:
            logger.info("ldm.training.init_checkpoint: %s was trained on latents scaled by %.8g; this run scales by "
                        "%.8g%s", found.path, found.scale_factor, self.scale_factor,
                        "" if self.training.scale_factor is not None else
                        f" (computed; set ldm.training.scale_factor: {found.scale_factor:.8g} to keep the file's)")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """What :meth:`state_dict` saved (the record is read before the stage is built:
        :meth:`LatentRecord.from_checkpoint`); a checkpoint without EMA weights starts the EMA afresh."""
        _load_network_state(self, state, "unet", self.unet)


def build_ldm_training(
    config: Config, latent_shape: tuple[int, ...], device: torch.device, precision: Precision, *,
    max_steps: int | None, max_epochs: int | None = None, world_size: int = 1,
    autoencoder: torch.nn.Module | None = None, scale_factor: float = 1.0, encoder: ConditionEncoder | None = None,
    record: LatentRecord | None = None,
) -> LDMTraining:
    """The UNet, noise scheduler, optimizer and EMA of the config's LDM stage, for latents of ``latent_shape``
    (channels, then per axis), on ``device``. ``max_steps``, ``max_epochs`` and ``world_size`` as in
    :func:`build_autoencoder_training`; ``autoencoder`` (frozen) encodes image batches, ``scale_factor`` scales
    the latents, ``encoder`` gives the conditional UNet its inputs (None: unconditional) and ``record`` is what the
    checkpoint keeps beside the networks."""
    t = config.ldm.training
    kind = config.ldm.scheduler.type
    conditioning = encoder.unet_arguments() if encoder is not None else None
    unet = build_unet(config.ldm, latent_shape[0], len(latent_shape) - 1, conditioning).to(device)
    scheduler = build_scheduler(config.ldm.scheduler, kind, latent_shape)
    optimizer, lr_scheduler = _optimizer_and_schedule(unet.parameters(), t.lr, t, max_steps, max_epochs=max_epochs,
                                                      world_size=world_size)
    return LDMTraining(
        training=t, precision=precision, unet=unet, scheduler=scheduler, kind=kind, optimizer=optimizer,
        scaler=precision.make_scaler(), lr_scheduler=lr_scheduler,
        ema=build_ema(unet, t.ema_decay) if t.ema_decay is not None else None, device=device,
        autoencoder=autoencoder, scale_factor=scale_factor, encoder=encoder, record=record,
        condition_dropout=config.ldm.conditioning.dropout if conditioning is not None else 0.0,
    )


def ldm_latents(batch: dict, autoencoder: torch.nn.Module, scale_factor: float, precision: Precision,
                *, device: torch.device) -> torch.Tensor:
    """A fresh latent ``(mu + sigma * eps) * scale_factor`` per volume of a batch, from the cached posteriors
    (``batch["mu"]``, ``batch["sigma"]``) or by encoding ``batch["image"]`` with the frozen autoencoder."""
    if "mu" in batch:
        mu, sigma = batch["mu"].to(device, non_blocking=True), batch["sigma"].to(device, non_blocking=True)
    else:
        with torch.no_grad(), precision.autocast():
            images = torch.as_tensor(batch["image"]).as_subclass(torch.Tensor)
            mu, sigma = autoencoder.encode(images.to(device, non_blocking=True))
        mu, sigma = mu.float(), sigma.float()
    return (mu + sigma * torch.randn_like(sigma)) * scale_factor


def ldm_micro_step(parts: LDMTraining, z: torch.Tensor, sync: bool = True,
                   model: torch.nn.Module | None = None, *, condition: Conditioning | None = None) -> torch.Tensor:
    """Forward and backward of one micro-batch of latents: the scheduler's training target
    (:func:`~monai_diffusion.diffusion.diffusion_loss`, ``ldm.training.loss``) under the run's precision, divided by
    the accumulation count. ``sync`` and ``model`` as in :func:`autoencoder_micro_step`. A conditional UNet takes the
    batch's ``condition``, each sample's dropped to the null condition with ``condition_dropout`` (classifier-free
    guidance). Returns the (unscaled) loss."""
    model = model if model is not None else parts.unet
    denoiser = model if condition is None else functools.partial(
        unet_output, model, condition=condition.dropped(parts.condition_dropout).to(z.device))
    return _diffusion_backward(parts, denoiser, z, model, sync=sync)


def _diffusion_backward(parts: LDMTraining | ControlNetTraining, denoiser, z: torch.Tensor, model: torch.nn.Module,
                        *, sync: bool) -> torch.Tensor:
    """The diffusion loss of ``denoiser`` on ``z``, backward (scaled, divided by the accumulation count), gradients
    all-reduced only when ``sync`` (``model`` is what DDP wraps)."""
    with gradient_sync(model, sync):
        loss = diffusion_loss(denoiser, parts.scheduler, parts.kind, z, precision=parts.precision,
                              loss=parts.training.loss)
        parts.scaler.scale(loss / parts.training.gradient_accumulation_steps).backward()
    return loss


def ldm_update(parts: LDMTraining) -> StepResult:
    """The optimizer step after the last micro-batch, then the EMA (only when the step was taken)."""
    return _update(parts.unet, parts.optimizer, parts.scaler, parts.lr_scheduler, ema=parts.ema,
                   training=parts.training)


def ldm_epoch_end(parts: LDMTraining) -> None:
    """At the end of a whole epoch: advance the LR schedule when it counts epochs (``lr_schedule_interval: epoch``)."""
    _epoch_end(parts.lr_scheduler, parts.training)


def _epoch_end(lr_scheduler: LRScheduler, training: LDMTrainingConfig) -> None:
    if training.lr_schedule_interval == "epoch":
        lr_scheduler.step()


def _network_state(parts: LDMTraining | ControlNetTraining, key: str, network: torch.nn.Module) -> dict[str, Any]:
    """The checkpoint entries of a stage that trains one network: the network (under ``key``), its EMA, optimizer,
    scaler and LR schedule."""
    return {
        key: network.state_dict(),
        "ema": parts.ema.state_dict() if parts.ema is not None else None,
        "optimizer": parts.optimizer.state_dict(),
        "scaler": parts.scaler.state_dict(),
        "lr_scheduler": parts.lr_scheduler.state_dict(),
    }


def _load_network_state(parts: LDMTraining | ControlNetTraining, state: dict[str, Any], key: str,
                        network: torch.nn.Module) -> None:
    """What :func:`_network_state` saved; a checkpoint without EMA weights starts the EMA from the current ones."""
    network.load_state_dict(state[key])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.lr_scheduler.load_state_dict(state["lr_scheduler"])
    parts.scaler.load_state_dict(state["scaler"])
    if parts.ema is not None and state.get("ema") is not None:
        parts.ema.load_state_dict(state["ema"])
    elif parts.ema is not None:
        logger.warning("the checkpoint has no EMA weights: the EMA starts from the current weights")


def _update(network: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
            lr_scheduler: LRScheduler, *, ema: AveragedModel | None, training: LDMTrainingConfig) -> StepResult:
    """The optimizer step of ``network`` after its last micro-batch, then its EMA (only when the step was taken)."""
    result = optimizer_step(optimizer, scaler, network.parameters(), training.grad_clip,
                            lr_scheduler=_per_step(lr_scheduler, training))
    if ema is not None and result.stepped:
        ema.update_parameters(network)
    return result


# ------------------------------------------------------------------------------------------------ ControlNet


@dataclass
class ControlNetTraining:
    """What a ControlNet training step works on (:func:`build_controlnet_training`).

    Attributes:
        training: the ``controlnet.training`` section.
        precision: autocast and gradient scaler of the run.
        unet: the trained diffusion UNet, frozen (eval mode, no gradients into its weights).
        controlnet: MONAI's ControlNet being trained, started from the UNet's weights.
        scheduler, kind: the LDM's noise scheduler and its type.
        optimizer, scaler, lr_scheduler: the ControlNet's optimizer, gradient scaler and LR schedule.
        ema: the EMA of the ControlNet's weights, None when ``ema_decay`` is None.
        num_labels: label values of the masks (``controlnet.num_labels``).
        control_size: the spatial size the ControlNet takes the masks at (:func:`control_size`).
        device: where the networks are.
        autoencoder, scale_factor, encoder: the LDM's frozen autoencoder, latent scale factor and conditions'
            encoder (as :class:`LDMTraining`'s).
        mask_key: the batch entry holding the label maps (``data.mask_key``).
        record: what the checkpoint keeps beside the networks (None: a step that is only measured).
        condition_dropout: the LDM's ``ldm.conditioning.dropout`` (the covariates keep their guidance; the mask is
            never dropped).
        model: what the forward runs through (:meth:`wrap`; None: the ControlNet itself).
    """

    training: ControlNetTrainingConfig
    precision: Precision
    unet: DiffusionModelUNet
    controlnet: ControlNet
    scheduler: object
    kind: str
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    lr_scheduler: LRScheduler
    ema: AveragedModel | None
    num_labels: int
    control_size: tuple[int, ...]
    device: torch.device
    autoencoder: torch.nn.Module | None = None
    scale_factor: float = 1.0
    encoder: ConditionEncoder | None = None
    mask_key: str = "mask"
    record: ControlRecord | None = None
    condition_dropout: float = 0.0
    model: torch.nn.Module | None = None

    section: ClassVar[str] = "controlnet"

    def wrap(self, device: DeviceConfig, dist: DistInfo | None = None) -> list[torch.nn.Module]:
        """Run the forward through :func:`training_model` of the ControlNet (DDP, compile); returns it."""
        self.model = training_model(self.controlnet, device, dist)
        return [self.model]

    def networks(self) -> list[torch.nn.Module]:
        return [self.controlnet]

    def train(self) -> None:
        (self.model if self.model is not None else self.controlnet).train()

    def micro_step(self, batch: dict, *, step: int, sync: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:func:`controlnet_micro_step` on a batch of the loader: its latents, control input
        (:func:`controlnet_control`) and conditions. Returns the loss, also as the one term ``loss``."""
        z = ldm_latents(batch, self.autoencoder, self.scale_factor, self.precision, device=self.device)
        control = controlnet_control(self, batch, self.device, self.mask_key)
        condition = self.encoder.encode_batch(batch) if self.encoder is not None else None
        loss = controlnet_micro_step(self, z, control, sync, model=self.model, condition=condition)
        return loss, {"loss": loss}

    def update(self, step: int) -> StepResult:
        return controlnet_update(self)

    def epoch_end(self) -> None:
        controlnet_epoch_end(self)

    def state_dict(self) -> dict[str, Any]:
        """The ControlNet, its EMA, optimizer, scaler and LR schedule, and the :class:`ControlRecord`."""
        return {**_network_state(self, "controlnet", self.controlnet), **self.record.state_dict()}

    def load_init(self) -> None:
        """A fresh run's start: the ControlNet (and its EMA) from ``controlnet.training.init_checkpoint`` when set,
        in place of the UNet's copy it was built as (with ``init_strict`` false what the file lacks stays the
        copy's)."""
        _init_weights(self.controlnet, self.training, self.section, self.ema)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """What :meth:`state_dict` saved (the record is read before the stage is built:
        :meth:`ControlRecord.from_checkpoint`)."""
        _load_network_state(self, state, "controlnet", self.controlnet)


@dataclass(frozen=True)
class ControlRecord:
    """What a ControlNet checkpoint keeps beside its networks: the LDM it steers (its checkpoint file and the digest
    of the weights it samples with) and the latents' shape.

    Attributes:
        ldm_checkpoint: the LDM's checkpoint file.
        ldm_hash: the digest of the LDM's sampling weights (``generation.load_ldm``).
        latent_shape: (channels, then per axis).
    """

    ldm_checkpoint: Path
    ldm_hash: str
    latent_shape: tuple[int, ...]

    def state_dict(self) -> dict[str, Any]:
        return {"ldm_checkpoint": str(self.ldm_checkpoint), "ldm_hash": self.ldm_hash,
                "latent_shape": list(self.latent_shape)}

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> ControlRecord:
        return cls(ldm_checkpoint=Path(state["ldm_checkpoint"]), ldm_hash=state["ldm_hash"],
                   latent_shape=tuple(int(size) for size in state["latent_shape"]))


def build_controlnet_training(
    config: Config, trained: Config, unet: DiffusionModelUNet, latent_shape: tuple[int, ...], *,
    device: torch.device, precision: Precision, max_steps: int | None, max_epochs: int | None = None,
    world_size: int = 1, autoencoder: torch.nn.Module | None = None, scale_factor: float = 1.0,
    encoder: ConditionEncoder | None = None, mask_key: str = "mask", record: ControlRecord | None = None,
) -> ControlNetTraining:
    """The ControlNet of the config's ControlNet stage beside the trained ``unet`` (frozen here), with its
    optimizer and EMA, on ``device``.

    The ControlNet copies the UNet's encoder and mid-block weights (MONAI's tutorial and MAISI start it so); its
    output convolutions start at zero, so training begins from the LDM's own predictions.

    Args:
        config: the run's config (``controlnet``).
        trained: the LDM's own config (its ``ldm`` section shapes the UNet, ControlNet and scheduler).
        unet: the LDM's UNet on ``device`` (its EMA weights when it kept them).
        latent_shape: (channels, then per axis).
        device, precision, max_steps, max_epochs, world_size: as :func:`build_autoencoder_training`.
        autoencoder, scale_factor, encoder: the LDM's frozen autoencoder, latent scale factor and conditions'
            encoder (None: unconditional).
        mask_key: the batch entry holding the label maps.
        record: what the checkpoint keeps beside the networks.
    """
    t = config.controlnet.training
    kind = trained.ldm.scheduler.type
    conditioning = encoder.unet_arguments() if encoder is not None else None
    unet.eval().requires_grad_(False)
    controlnet = build_controlnet(trained.ldm, config.controlnet, latent_shape[0], len(latent_shape) - 1,
                                  conditioning=conditioning)
    # Every weight whose name and shape the UNet shares (MONAI's copy_model_state, as MAISI starts its ControlNet: the
    # residual blocks of MAISI's UNet take a wider time embedding, which also embeds the spacing, than its ControlNet's).
    copy_model_state(controlnet, unet.state_dict())
    controlnet = controlnet.to(device)
    scheduler = build_scheduler(trained.ldm.scheduler, kind, latent_shape)
    optimizer, lr_scheduler = _optimizer_and_schedule(controlnet.parameters(), t.lr, t, max_steps,
                                                      max_epochs=max_epochs, world_size=world_size)
    return ControlNetTraining(
        training=t, precision=precision, unet=unet, controlnet=controlnet, scheduler=scheduler, kind=kind,
        optimizer=optimizer, scaler=precision.make_scaler(), lr_scheduler=lr_scheduler,
        ema=build_ema(controlnet, t.ema_decay) if t.ema_decay is not None else None,
        num_labels=config.controlnet.num_labels,
        control_size=control_size(latent_shape[1:], config.controlnet.conditioning_embedding_num_channels),
        device=device, autoencoder=autoencoder, scale_factor=scale_factor, encoder=encoder, mask_key=mask_key,
        record=record, condition_dropout=trained.ldm.conditioning.dropout if conditioning is not None else 0.0,
    )


def controlnet_control(parts: ControlNetTraining, batch: dict, device: torch.device, mask_key: str) -> torch.Tensor:
    """A batch's control input on ``device``: precomputed (``batch["control"]``, beside cached latents) or from its
    label maps on the image grid (``batch[mask_key]``, with on-the-fly encoding)."""
    if "control" in batch:
        return batch["control"].to(device, non_blocking=True)
    masks = torch.as_tensor(batch[mask_key]).as_subclass(torch.Tensor)
    return control_input(masks.to(device, non_blocking=True), parts.num_labels, parts.control_size)


def controlnet_micro_step(parts: ControlNetTraining, z: torch.Tensor, control: torch.Tensor, sync: bool = True,
                          *, model: torch.nn.Module | None = None,
                          condition: Conditioning | None = None) -> torch.Tensor:
    """Forward and backward of one micro-batch: the LDM's training target, predicted by the frozen UNet with the
    ControlNet's residuals for the batch's ``control`` input; only the ControlNet learns. ``sync``, ``model`` (the
    DDP-wrapped ControlNet) and ``condition`` as in :func:`ldm_micro_step`. Returns the (unscaled) loss."""
    model = model if model is not None else parts.controlnet
    if condition is not None:
        condition = condition.dropped(parts.condition_dropout).to(z.device)
    denoiser = functools.partial(unet_output, parts.unet, condition=condition, controlnet=model, control=control)
    return _diffusion_backward(parts, denoiser, z, model, sync=sync)


def controlnet_update(parts: ControlNetTraining) -> StepResult:
    """The ControlNet's optimizer step after the last micro-batch, then its EMA (only when the step was taken)."""
    return _update(parts.controlnet, parts.optimizer, parts.scaler, parts.lr_scheduler, ema=parts.ema,
                   training=parts.training)


def controlnet_epoch_end(parts: ControlNetTraining) -> None:
    """At the end of a whole epoch: advance the LR schedule when it counts epochs (``lr_schedule_interval: epoch``)."""
    _epoch_end(parts.lr_scheduler, parts.training)
