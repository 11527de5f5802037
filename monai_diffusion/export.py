"""``monai-diffusion export``: write a trained LDM run (and its ControlNet) as a MONAI bundle.

``monai-diffusion export RUN --format bundle OUT`` reads the LDM checkpoint of RUN (a run folder: its best.pt, else
last.pt; or a checkpoint file) and the autoencoder it was trained on, and writes OUT:

- ``configs/inference.json``: the networks by ``_target_`` with the run's constructor arguments, their weights from
  ``models/``, the noise scheduler, and :class:`~monai_diffusion.bundle.LatentDiffusionSampler`, which generates
  volumes as ``monai-diffusion sample`` does (``python -m monai.bundle run --config_file configs/inference.json``);
- ``configs/metadata.json``: MONAI's bundle metadata (versions, required packages, each network's data format, the
  conditions and their vocabularies, MAISI's UNet's spacing and modality among them, the evaluation's figures);
- ``configs/logging.conf``;
- ``models/model.pt`` (the UNet: its EMA weights where the run kept them), ``models/autoencoder.pt`` and, with
  ``--controlnet RUN``, ``models/controlnet.pt``: plain state dicts;
- ``docs/README.md`` (how it was trained: data, networks, steps, evaluation, how to run it) and the runs' configs.

The bundle is assembled in a temporary folder next to OUT and moved into place once complete; its networks are built
from the written ``inference.json`` and their weights loaded before that, so a bundle that exists is one that loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser

from monai_diffusion import __version__, command_description
from monai_diffusion.conditioning import MODALITY_KEY, ConditionEncoder, control_size
from monai_diffusion.config.loading import apply_overrides, config_from_dict, save_config
from monai_diffusion.config.schema import Config
from monai_diffusion.config.stages import stage_config
from monai_diffusion.engine.checkpoint import CheckpointError, load_checkpoint
from monai_diffusion.engine.logging import exit_status, get_logger
from monai_diffusion.generation import LoadedLDM, condition_dropout, ema_weights, load_ldm, load_ldm_checkpoint
from monai_diffusion.latents import SPACING_KEY, voxel_spacing
from monai_diffusion.networks.builders import (
    Definition,
    autoencoder_definition,
    controlnet_definition,
    scheduler_definition,
    unet_definition,
)

# The bundle metadata schema MONAI's model zoo uses (verify_metadata downloads it from here).
METADATA_SCHEMA = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                   "meta_schema_20240725.json")
FORMATS = ("bundle",)
# Packages ``python -m monai.bundle run`` needs beside this package's own dependencies (MONAI's command line).
BUNDLE_RUNNER_PACKAGES = ("fire",)
# MONAI's metadata names these three in keys of their own.
VERSIONED_ELSEWHERE = {"torch", "monai", "numpy"}

REFERENCES = {
    "ldm": "Rombach et al. High-Resolution Image Synthesis with Latent Diffusion Models. CVPR 2022.",
    "brain": "Pinaya et al. Brain Imaging Generation with Latent Diffusion Models. DGM4MICCAI 2022.",
    "rflow": "Liu, Gong and Liu. Flow Straight and Fast: Learning to Generate and Transfer Data with Rectified Flow. "
             "ICLR 2023.",
    "guidance": "Ho and Salimans. Classifier-Free Diffusion Guidance. NeurIPS 2021 Workshop.",
    "controlnet": "Zhang, Rao and Agrawala. Adding Conditional Control to Text-to-Image Diffusion Models. ICCV 2023.",
}

# MONAI's console format for everything but monai-diffusion's messages, which its own handler prints once.
LOGGING_CONF = """\
[loggers]
keys=root,monai_diffusion

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[logger_monai_diffusion]
level=INFO
handlers=
propagate=0
qualname=monai_diffusion

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


# ------------------------------------------------------------------------------------------------ the run


def run_folder(checkpoint: Path) -> Path:
    """The run folder a checkpoint file belongs to (``<run>/checkpoints/x.pt`` -> ``<run>``)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def autoencoder_checkpoint(path: Path) -> dict:
    """The autoencoder's checkpoint (its step), or {} where it is a plain state dict or has moved."""
    try:
        return load_checkpoint(path)
    except (CheckpointError, FileNotFoundError):
        return {}


def evaluation_of(run: Path) -> dict | None:
    """``<run>/evaluation/summary.json`` as ``monai-diffusion evaluate`` wrote it, or None."""
    path = run / "evaluation" / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def eval_metrics(ldm_report: dict | None, autoencoder_report: dict | None) -> dict[str, float]:
    """The evaluations' figures, flat: the LDM's diversity, MMD and FID; the autoencoder's mean metrics (and the
    trilinear baseline's) over its held-out volumes."""
    metrics = {}
    if ldm_report is not None:
        metrics |= {f"ldm_{key}": value for key, value in ldm_report.items()
                    if key in ("diversity_ms_ssim_samples", "diversity_ms_ssim_real", "diversity_ratio", "mmd",
                               "mmd_floor") and value is not None}
        metrics |= {f"ldm_fid_{name}{part}": entry[f"fid{part}"] for name, entry in _fid_entries(ldm_report).items()
                    for part in ("", "_floor") if entry.get(f"fid{part}") is not None}
    if autoencoder_report is not None:
        metrics |= {f"{name}_mean": stats["mean"] for name, stats in autoencoder_report.get("summary", {}).items()}
    return metrics


def _fid_entries(ldm_report: dict) -> dict[str, dict]:
    """Protocol -> FID entry of an LDM evaluation; a report written before FID had protocols (one ``fid`` number
    and its ``fid_network``) as one entry without a floor."""
    fid = ldm_report.get("fid")
    if isinstance(fid, dict):
        return fid
    return {} if fid is None else {str(ldm_report.get("fid_network")): {"fid": fid, "scale": 1.0}}


def required_packages() -> dict[str, str]:
    """The packages the bundle's inference imports beside MONAI, torch and numpy, with the versions installed now:
    this package, its dependencies, and what ``python -m monai.bundle`` needs."""
    names = []
    try:
        names = [_requirement_name(text) for text in requires("monai-diffusion") or [] if "extra ==" not in text]
    except PackageNotFoundError:  # run from a source tree without installing it: its known direct needs
        names = ["nibabel", "pydantic", "pyyaml", "pillow", "tqdm"]
    packages = {"monai-diffusion": __version__}
    for name in [*names, *BUNDLE_RUNNER_PACKAGES]:
        if name.lower() in VERSIONED_ELSEWHERE:
            continue
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = "not installed where the bundle was exported"
    return packages


def _requirement_name(text: str) -> str:
    name = text.split(";")[0].strip()
    for stop in "<>=!~[ ":
        name = name.split(stop)[0]
    return name


# ------------------------------------------------------------------------------------------- data formats


def _tensor(kind: str, fmt: str, channels: int, shape, *, dtype: str, value_range=(), channel_def: dict | None = None,
            ) -> dict:
    return {"type": kind, "format": fmt, "num_channels": int(channels), "spatial_shape": [int(s) for s in shape],
            "dtype": dtype, "value_range": list(value_range), "is_patch_data": False,
            "channel_def": channel_def or {}}


def condition_inputs(encoder: ConditionEncoder | None) -> dict:
    """The UNet's (and ControlNet's) conditioning inputs, each feature of the context vector named; MAISI's UNet's
    spacing and modality (its ControlNet takes the modality only)."""
    if encoder is None:
        return {}
    inputs = {}
    if encoder.context_dim is not None:
        features = {"0": "1: conditioned, 0: the null condition (classifier-free guidance)"}
        for condition in encoder.conditions:
            if condition["type"] == "continuous":
                features[str(len(features))] = (f"{condition['name']}, standardised: (value - {condition['mean']:g}) "
                                                f"/ {condition['std']:g}")
            elif encoder.categorical_via == "cross_attention":
                for category in condition["categories"]:
                    features[str(len(features))] = f"{condition['name']} = {category} (one-hot)"
        inputs["context"] = _tensor("tensor", "context", 1, [encoder.context_dim], dtype="float32",
                                    channel_def=features)
    if encoder.num_class_embeds is not None:
        inputs["class_labels"] = _tensor("tensor", "class", 1, [], dtype="int64",
                                         value_range=[0, encoder.num_class_embeds - 1],
                                         channel_def={"0": "the null condition; 1 + the combination of categories "
                                                           "otherwise"})
    if encoder.takes_spacing:
        inputs["spacing_tensor"] = _tensor("tensor", "spacing", 1, [3], dtype="float32",
                                           channel_def={"0": "the voxel spacing in mm per axis x 100 (MAISI's "
                                                             "scaling); the bundle's `spacing`"})
    if encoder.modalities is not None:
        codes = ", ".join(f"{name} {code}" for name, code in encoder.modalities.items())
        inputs["class_labels"] = _tensor("tensor", "class", 1, [], dtype="int64",
                                         value_range=[0, max(encoder.modalities.values())],
                                         channel_def={"0": f"MAISI's modality code ({codes}; 0, unknown, is the null "
                                                           "condition); the bundle's `modality`"})
    return inputs


def maisi_defaults(ldm: LoadedLDM, *, with_controlnet: bool) -> dict:
    """The bundle's ``spacing`` and ``modality`` for MAISI's UNet, each where the UNet takes it: the training data's
    voxel spacing (None with a ControlNet: the label map's, as ``sample`` takes it) and the run's modality, which
    ``sample`` defaults to."""
    encoder, defaults = ldm.encoder, {}
    if encoder is not None and encoder.takes_spacing:
        defaults["spacing"] = None if with_controlnet else voxel_spacing(ldm.affine).tolist()
    if encoder is not None and encoder.modalities is not None:
        defaults["modality"] = encoder.maisi["modality"]
    return defaults


def maisi_conditions(ldm: LoadedLDM, *, with_controlnet: bool) -> list[dict]:
    """MAISI's UNet's own inputs as ``metadata.json`` lists them after the covariates: the bundle key that sets
    each, its default, and the modality's vocabulary."""
    defaults, listed = maisi_defaults(ldm, with_controlnet=with_controlnet), []
    if "spacing" in defaults:
        listed.append({"name": SPACING_KEY, "type": "voxel_spacing", "bundle_key": "spacing", "unit": "mm",
                       "default": defaults["spacing"],
                       "description": "the voxel spacing to generate at, mm per axis (null: the label map's); the "
                                      "samples' affine takes it; the UNet's spacing_tensor is it x 100"})
    if "modality" in defaults:
        listed.append({"name": MODALITY_KEY, "type": "categorical", "bundle_key": "modality",
                       "categories": list(ldm.encoder.modalities), "codes": dict(ldm.encoder.modalities),
                       "default": defaults["modality"],
                       "description": "the samples' modality, a name of MAISI's vocabulary (modality_mapping.json); "
                                      "the UNet's class_labels is its code, 0 (unknown) the null condition"})
    return listed


def data_formats(trained: Config, ldm: LoadedLDM, controlnet_config=None) -> dict:
    """``*_data_format`` of MONAI's metadata for each network of the bundle."""
    channels, voxel_size = trained.autoencoder.in_channels, trained.data.voxel_size
    intensity = trained.data.intensity
    value_range = [intensity.b_min, intensity.b_max] if intensity.mode != "none" else []
    latent_channels, latent_spatial = ldm.latent_shape[0], ldm.latent_shape[1:]
    image_def = {str(c): f"image channel {c}" for c in range(channels)}
    kind = trained.ldm.scheduler.type
    timestep_dtype = "float32" if kind == "rflow" else "int64"
    prediction = "velocity" if kind == "rflow" else trained.ldm.scheduler.prediction_type
    timesteps = _tensor("timesteps", "timesteps", 1, [], dtype=timestep_dtype,
                        value_range=[0, trained.ldm.scheduler.num_train_timesteps])
    latent = _tensor("latent", "latent", latent_channels, latent_spatial, dtype="float32",
                     channel_def={"0": f"noisy latent, scaled by the latent scale factor {ldm.scale_factor:.6g}"})
    formats = {
        "network_data_format": {
            "inputs": {"x": latent, "timesteps": timesteps, **condition_inputs(ldm.encoder)},
            "outputs": {"pred": _tensor(prediction, "latent", latent_channels, latent_spatial, dtype="float32",
                                        channel_def={"0": f"the {prediction} prediction ({kind})"})},
        },
        "autoencoder_data_format": {
            "inputs": {"image": _tensor("image", "magnitude", channels, voxel_size, dtype="float32",
                                        value_range=value_range, channel_def=image_def)},
            "outputs": {"pred": _tensor("image", "magnitude", channels, voxel_size, dtype="float32",
                                        value_range=value_range, channel_def=image_def)},
        },
    }
    if controlnet_config is not None:
        labels = controlnet_config.num_labels
        size = control_size(latent_spatial, controlnet_config.conditioning_embedding_num_channels)
        unet_channels = trained.ldm.unet.num_channels
        formats["controlnet_data_format"] = {
            "inputs": {
                "x": latent, "timesteps": timesteps,
                "controlnet_cond": _tensor("labels", "segmentation", labels - 1, size, dtype="float32",
                                           value_range=[0, 1],
                                           channel_def={str(i - 1): f"share of label {i} in the voxel"
                                                        for i in range(1, labels)}),
                **{name: value for name, value in condition_inputs(ldm.encoder).items()
                   if name != "spacing_tensor"},  # MAISI's ControlNet takes no spacing
            },
            "outputs": {
                "down_block_res_samples": _tensor("tensor", "residuals", unet_channels[0], latent_spatial,
                                                  dtype="float32",
                                                  channel_def={"0": "a sequence: one residual per skip connection of "
                                                               "the UNet's down path, at its level's size"}),
                "mid_block_res_sample": _tensor("tensor", "residuals", unet_channels[-1],
                                                [s // 2 ** (len(unet_channels) - 1) for s in latent_spatial],
                                                dtype="float32"),
            },
        }
    return formats


# ------------------------------------------------------------------------------------------------- configs


def inference_config(trained: Config, ldm: LoadedLDM, *, definitions: dict[str, Definition],
                     controlnet_config=None) -> dict:
    """``configs/inference.json``: the networks, their weights, the scheduler and the sampler, with the run's own
    sampling settings as the defaults that a ``--key value`` on ``monai.bundle run``'s command line replaces."""
    sampling = trained.ldm.sampling
    intensity = trained.data.intensity
    config = {
        "imports": ["$import torch", "$from monai_diffusion.bundle import load_weights"],
        "bundle_root": ".",
        "model_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/output'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "seed": trained.seed,
        "num_samples": sampling.num_samples,
        "num_inference_steps": sampling.num_inference_steps,
        "precision": stage_config(trained, "ldm").device.mixed_precision,
    }
    if ldm.encoder is not None:
        config |= {"conditions": None, "guidance_scale": sampling.guidance_scale}
    maisi = maisi_defaults(ldm, with_controlnet=controlnet_config is not None)
    config |= maisi
    if controlnet_config is not None:
        config |= {"mask": None, "control_scale": controlnet_config.conditioning_scale}
    config |= {
        "latent_shape": list(ldm.latent_shape),
        "scale_factor": ldm.scale_factor,
        "affine": ldm.affine.tolist(),
        "value_range": [intensity.b_min, intensity.b_max] if intensity.mode != "none" else None,
        "autoencoder_def": definitions["autoencoder"].bundle_config(),
        "network_def": definitions["network"].bundle_config(),
    }
    if controlnet_config is not None:
        config["controlnet_def"] = definitions["controlnet"].bundle_config()
    if trained.ldm.unet.architecture == "maisi":  # MAISI's UNet refuses SDPA without CUDA: as the builders choose
        for key in ("network_def", "controlnet_def"):
            if key in config:
                config[key]["use_flash_attention"] = "$torch.cuda.is_available()"
    config |= {
        "autoencoder": "$load_weights(@autoencoder_def, @model_dir + '/autoencoder.pt', "
                       "@device)",
        "network": "$load_weights(@network_def, @model_dir + '/model.pt', @device)",
    }
    if controlnet_config is not None:
        config["controlnet"] = ("$load_weights(@controlnet_def, @model_dir + "
                                "'/controlnet.pt', @device)")
    config["noise_scheduler"] = definitions["scheduler"].bundle_config()
    if ldm.encoder is not None:
        config["condition_encoder"] = {"_target_": "monai_diffusion.conditioning.ConditionEncoder",
                                       **ldm.encoder.state()}
    sampler = {
        "_target_": "monai_diffusion.bundle.LatentDiffusionSampler",
        "network": "@network",
        "autoencoder": "@autoencoder",
        "scheduler": "@noise_scheduler",
        "trained_scheduler": trained.ldm.scheduler.type,
        "latent_shape": "@latent_shape",
        "scale_factor": "@scale_factor",
        "affine": "@affine",
        "value_range": "@value_range",
        "device": "@device",
        "precision": "@precision",
        "tiled_decode": sampling.tiled_decode,
        "tile_size": sampling.tile_size,
        "tile_overlap": sampling.tile_overlap,
    }
    generate = ["seed=@seed", "num_samples=@num_samples", "num_inference_steps=@num_inference_steps",
                "output_dir=@output_dir"]
    if ldm.encoder is not None:
        sampler |= {"condition_encoder": "@condition_encoder", "condition_dropout": condition_dropout(ldm.state)}
        generate += ["conditions=@conditions", "guidance_scale=@guidance_scale"]
    generate += [f"{key}=@{key}" for key in maisi]
    if controlnet_config is not None:
        data = trained.data
        sampler |= {
            "controlnet": "@controlnet",
            "mask_data": {"orientation": data.orientation, "spacing": data.spacing, "voxel_size": data.voxel_size},
            "num_labels": "$@controlnet_def#conditioning_embedding_in_channels + 1",
            "control_channels": "@controlnet_def#conditioning_embedding_num_channels",
        }
        generate += ["mask=@mask", "control_scale=@control_scale"]
    config["sampler"] = sampler
    config["run"] = [f"$@sampler.generate({', '.join(generate)})"]
    return config


def data_source(trained: Config) -> str:
    """Where the training volumes came from, without the training machine's folders."""
    data = trained.data
    if data.source == "demo":
        return "monai-diffusion's demo brains (derived from the MNI152 template that nilearn ships)"
    if data.source == "folder":
        return f"the NIfTI files of a folder ({Path(data.data_dir or '').name}/{data.glob})"
    return f"the datalist {Path(data.datalist or '').name}"


def network_names(trained: Config) -> dict[str, tuple[str, str]]:
    """Whose class each of the bundle's networks is, and its name: ``autoencoder``, ``unet``, ``controlnet``."""
    maisi = trained.ldm.unet.architecture == "maisi"
    return {
        "autoencoder": ("MONAI's", "AutoencoderKlMaisi") if trained.autoencoder.architecture == "maisi"
        else ("monai-diffusion's", "AutoencoderKL"),
        "unet": ("MONAI's", "DiffusionModelUNetMaisi" if maisi else "DiffusionModelUNet"),
        "controlnet": ("MONAI's", "ControlNetMaisi" if maisi else "ControlNet"),
    }


def metadata(trained: Config, ldm: LoadedLDM, *, name: str, version_text: str, authors: str, copyright_text: str,
             run: Path, controlnet_config=None, metrics: dict[str, float]) -> dict:
    """``configs/metadata.json``."""
    intensity = trained.data.intensity
    channels, voxel_size = trained.autoencoder.in_channels, trained.data.voxel_size
    scaled = (f"intensity scaled to [{intensity.b_min:g}, {intensity.b_max:g}]" if intensity.mode != "none"
              else "intensities as loaded")
    spacing = f" of {' x '.join(f'{s:g}' for s in trained.data.spacing)} mm" if trained.data.spacing else ""
    kind = trained.ldm.scheduler.type
    conditional = ldm.encoder is not None
    unet_name, ae_name = (" ".join(network_names(trained)[key]) for key in ("unet", "autoencoder"))
    unet = trained.ldm.unet
    maisi_unet = unet.architecture == "maisi"
    inputs = [text for text, taken in (("a voxel spacing", unet.include_spacing_input),
                                       ("a modality", unet.num_class_embeds is not None)) if taken]
    task = ("Generation of 3D volumes" + (" conditioned on " + ", ".join(ldm.encoder.row_names) if conditional else "")
            + (" following a label map (ControlNet)" if controlnet_config is not None else "")
            + " with a latent diffusion model")
    description = (
        f"A latent diffusion model that generates {channels}-channel volumes of "
        f"{' x '.join(map(str, voxel_size))} voxels{spacing} ({scaled}) from Gaussian noise: {unet_name}"
        + (f" (MAISI's UNet{': it also takes ' + ' and '.join(inputs) if inputs else ''})" if maisi_unet else "")
        + f" denoises a {' x '.join(map(str, ldm.latent_shape))} latent ({kind}), which {ae_name}"
        + (f" (per-level downsampling factors {trained.autoencoder.downsample_factors})"
           if trained.autoencoder.architecture == "ours" else " (MAISI's VAE)")
        + f" decodes. Trained with monai-diffusion {__version__} for {ldm.step} optimizer steps (run {run.name})."
    )
    references = [REFERENCES["ldm"], REFERENCES["brain"]]
    references += [REFERENCES["rflow"]] if kind == "rflow" else []
    references += [REFERENCES["guidance"]] if conditional else []
    references += [REFERENCES["controlnet"]] if controlnet_config is not None else []
    meta = {
        "schema": METADATA_SCHEMA,
        "version": version_text,
        "changelog": {version_text: f"exported from the run {run.name} (step {ldm.step}) with monai-diffusion "
                                    f"{__version__}"},
        "monai_version": version("monai"),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": required_packages(),
        "supported_apps": {},
        "name": name,
        "task": task,
        "description": description,
        "authors": authors,
        "copyright": copyright_text,
        "data_source": data_source(trained),
        "data_type": "nibabel",
        "image_classes": f"{channels} channel(s), {scaled}",
        "pred_classes": f"a generated volume: {channels} channel(s), {scaled}",
        "eval_metrics": metrics,
        "intended_use": "Research on generative models of medical volumes; not for clinical use",
        "references": references,
        **data_formats(trained, ldm, controlnet_config),
    }
    if conditional:
        meta["conditioning"] = {"categorical_via": ldm.encoder.categorical_via,
                                "dropout": condition_dropout(ldm.state),
                                "conditions": [dict(c) for c in ldm.encoder.conditions]
                                + maisi_conditions(ldm, with_controlnet=controlnet_config is not None)}
    if controlnet_config is not None:
        meta["label_classes"] = (f"a label map with values 0..{controlnet_config.num_labels - 1} (0: background), on "
                                 f"any grid: reoriented, resampled and cropped as the training volumes were")
    return meta


# ------------------------------------------------------------------------------------------------ README


def _yaml_block(path: Path) -> str:
    return f"```yaml\n{path.read_text().rstrip()}\n```"


def readme(trained: Config, ldm: LoadedLDM, *, meta: dict, run: Path, ae_step, controlnet_state: dict | None,
           ldm_report: dict | None, autoencoder_report: dict | None, configs: dict[str, str]) -> str:
    """``docs/README.md``: what the bundle generates, how it was trained, its evaluation, how to run it."""
    training = trained.ldm.training
    sampling = trained.ldm.sampling
    ae, unet = trained.autoencoder, trained.ldm.unet
    maisi = maisi_defaults(ldm, with_controlnet=controlnet_state is not None)
    names = network_names(trained)
    unet_name, ae_name, controlnet_name = (" ".join(names[key]) for key in ("unet", "autoencoder", "controlnet"))
    lines = [
        f"# {meta['name']}",
        "",
        meta["description"],
        "",
        f"Exported on {datetime.now(timezone.utc):%Y-%m-%d} with `monai-diffusion export` {__version__}. "
        f"Intended use: {meta['intended_use'].lower()}.",
        "",
        "## How it was trained",
        "",
        f"- Data: {meta['data_source']}; volumes of {' x '.join(map(str, trained.data.voxel_size))} voxels "
        f"({meta['image_classes']}), orientation {trained.data.orientation}.",
        f"- Autoencoder: {ae_name}, channels {ae.num_channels}, "
        + (f"downsampling factors {ae.downsample_factors}" if ae.architecture == "ours"
           else f"{2 ** (len(ae.num_channels) - 1)}x per axis")
        + f", {ae.latent_channels} latent channels"
        + (f", trained for {ae_step} steps" if ae_step is not None else "") + "; frozen while the LDM trained.",
        f"- Latent: {' x '.join(map(str, ldm.latent_shape))}, scale factor {ldm.scale_factor:.6g} (computed once from "
        "the training latents).",
        f"- Diffusion UNet: {unet_name}, channels {unet.num_channels}, attention {unet.attention_levels}; "
        f"{trained.ldm.scheduler.type} with "
        f"{trained.ldm.scheduler.num_train_timesteps} training timesteps"
        + (f", {trained.ldm.scheduler.prediction_type} prediction" if trained.ldm.scheduler.type != "rflow" else "")
        + ".",
        f"- Training: {ldm.step} optimizer steps, batch size {training.batch_size}, learning rate {training.lr:g}, "
        f"seed {trained.seed}; the weights in `models/model.pt` are {ldm.weights}"
        + (f" (decay {training.ema_decay:g})" if ldm.weights == "EMA" else "") + ".",
    ]
    if ldm.encoder is not None and ldm.encoder.conditions:
        described = []
        for condition in ldm.encoder.conditions:
            if condition["type"] == "continuous":
                described.append(f"`{condition['name']}` (continuous; training mean {condition['mean']:g}, "
                                 f"std {condition['std']:g})")
            else:
                described.append(f"`{condition['name']}` (one of {', '.join(map(str, condition['categories']))})")
        lines.append(f"- Conditions: {'; '.join(described)}, given to the UNet by "
                     f"{ldm.encoder.categorical_via.replace('_', ' ')}; condition dropout "
                     f"{condition_dropout(ldm.state):g} (classifier-free guidance).")
    if maisi:
        source = ldm.encoder.maisi
        given = (["each training volume's voxel spacing (mm, from its affine; x 100 as MAISI feeds it)"]
                 if "spacing" in maisi else [])
        if "modality" in maisi:
            given.append(f"its modality (datalist field `{source['modality_key']}`)" if source["modality_key"]
                         else f"its modality (`{source['modality']}` for every volume)")
            given[-1] += (f", dropped as MAISI drops it with probability {condition_dropout(ldm.state):g} (to "
                          "`unknown`, ct_* / mri_* to ct / mri)")
        lines.append(f"- MAISI's inputs: the UNet took {' and '.join(given)}.")
    if controlnet_state is not None:
        controlnet = config_from_dict(controlnet_state["config"], source="ControlNet").controlnet
        lines.append(f"- ControlNet: {controlnet_name} on label maps with {controlnet.num_labels} values, "
                     f"{controlnet_state['step']} optimizer steps on the frozen LDM; weights in "
                     "`models/controlnet.pt` " + ("(EMA)" if controlnet_state.get("ema") is not None else "(raw)")
                     + ".")
    lines += ["", "The runs' own configs, as they were resolved for training (their paths are the training machine's):",
              ""]
    lines += [f"- [{file}]({file}): {what}" for file, what in configs.items()]
    lines += ["", "## Evaluation", ""]
    if ldm_report is None and autoencoder_report is None:
        lines += ["The runs hold no evaluation (`monai-diffusion evaluate RUN` writes one to `<run>/evaluation/`; "
                  "export again afterwards to include it).", ""]
    if autoencoder_report is not None:
        lines += [f"The autoencoder against trilinear resampling through a grid with as many values as the latent, on "
                  f"{autoencoder_report.get('volumes')} held-out volume(s) (`monai-diffusion evaluate`, its step "
                  f"{autoencoder_report.get('checkpoint_step')}):", "", _summary_table(autoencoder_report), ""]
    if ldm_report is not None:
        stale = (f" (evaluated at step {ldm_report.get('checkpoint_step')}, exported at step {ldm.step})"
                 if ldm_report.get("checkpoint_step") not in (None, ldm.step) else "")
        lines += [f"Generated against real volumes{stale} (the floor: the same measure between two halves of the "
                  f"real volumes, n = {ldm_report.get('n', '-')} per set):", "",
                  "| measure | model | real-vs-real floor |", "|---|---|---|",
                  f"| samples / real volumes | {ldm_report.get('num_samples')} / {ldm_report.get('num_real')} | |",
                  f"| mean pairwise MS-SSIM among samples / among real volumes (lower = more diverse) | "
                  f"{_number(ldm_report.get('diversity_ms_ssim_samples'))} | "
                  f"{_number(ldm_report.get('diversity_ms_ssim_real'))} |",
                  f"| MMD real vs generated | {_number(ldm_report.get('mmd'))} | "
                  f"{_number(ldm_report.get('mmd_floor'))} |"]
        for name, entry in _fid_entries(ldm_report).items():
            scale = entry.get("scale", 1.0)
            factor = "" if scale == 1 else f" x {scale:g}"
            lines.append(f"| FID ({name}){factor} | {_number(_times(entry.get('fid'), scale))} | "
                         f"{_number(_times(entry.get('fid_floor'), scale))} |")
        lines.append("")
    run_options = "--num_samples 4 --seed 0"
    if ldm.encoder is not None and ldm.encoder.conditions:
        example = ", ".join(f"'{c['name']}': " + (f"{c['mean']:g}" if c["type"] == "continuous"
                                                   else repr(c["categories"][0])) for c in ldm.encoder.conditions)
        run_options += f" --conditions \"{{{example}}}\""
    if controlnet_state is not None:
        run_options += " --mask labels.nii.gz"
    if maisi.get("spacing") is not None:  # with a ControlNet, the label map's
        run_options += ' --spacing "[1.5, 1.5, 2.0]"'
    if "modality" in maisi:
        run_options += f" --modality {maisi['modality']}"
    lines += [
        "## Running it",
        "",
        f"In the bundle's folder, with monai-diffusion {__version__} installed (`pip install .` in its repository) "
        "and MONAI's command line (`pip install fire`):",
        "",
        "```bash",
        "python -m monai.bundle run --config_file configs/inference.json",
        f"python -m monai.bundle run --config_file configs/inference.json {run_options} --output_dir generated",
        "```",
        "",
        f"This writes `sample-NNN.nii.gz` and `.png` to `output/` (or `--output_dir`): sample i of a seed is sample i "
        f"of `monai-diffusion sample` with that seed, voxel for voxel on the same device. The defaults are the run's "
        f"own (`seed` {trained.seed}, `num_inference_steps` {sampling.num_inference_steps}, `num_samples` "
        f"{sampling.num_samples}"
        + (f", `guidance_scale` {sampling.guidance_scale:g}" if ldm.encoder is not None else "") + "); any key of "
        "`configs/inference.json` can be given on the command line. Change `noise_scheduler#_target_` to "
        "`monai.networks.schedulers.ddim.DDIMScheduler` to sample a DDPM-trained model with DDIM.",
        "",
    ]
    if maisi:
        settings = []
        if "spacing" in maisi:
            default = maisi["spacing"]
            settings.append("`spacing`, mm per axis (default "
                            + (f"{default}, the training data's)" if default is not None else "null: the label map's)"))
        if "modality" in maisi:
            settings.append(f"`modality`, a name of MAISI's vocabulary ({', '.join(ldm.encoder.modalities)}; default "
                            f"`{maisi['modality']}`)")
        lines += [
            "MAISI's UNet generates at a voxel spacing and for a modality, which the bundle takes as `monai-diffusion "
            f"sample` takes `--spacing` and `--modality`: {'; '.join(settings)}. The UNet receives the spacing x 100 "
            "and the modality's code (`configs/metadata.json` lists the vocabulary); the samples' affine takes the "
            "spacing, and their file names and `samples.csv` record both.",
            "",
        ]
    lines += [
        "The networks are " + ", ".join(f"{whose} `{name}`" for key, (whose, name) in names.items()
                                        if key != "controlnet" or controlnet_state is not None)
        + ", built by `_target_` in `configs/inference.json` from the weights "
        "in `models/` (plain state dicts). The sampling loop is monai-diffusion's own "
        "(`monai_diffusion.bundle.LatentDiffusionSampler`): the bundle needs the package, and in return its volumes "
        "are exactly the run's.",
        "",
    ]
    return "\n".join(lines)


def _number(value) -> str:
    return "not computed" if value is None else f"{value:.4g}"


def _times(value: float | None, scale: float) -> float | None:
    return None if value is None else value * scale


def _summary_table(report: dict) -> str:
    summary = report.get("summary", {})
    metrics = sorted({name.split("_", 1)[1] for name in summary})
    rows = ["| metric | autoencoder | trilinear |", "|---|---|---|"]
    for metric in metrics:
        cells = [summary.get(f"{side}_{metric}") for side in ("autoencoder", "trilinear")]
        rows.append(f"| {metric} | " + " | ".join(
            f"{cell['mean']:.4g} +- {cell.get('std', 0):.2g}" if cell else "" for cell in cells) + " |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------------ export


def export_bundle(run: Path, out: Path, *, controlnet: Path | None = None, overrides: list[str] | None = None,
                  name: str | None = None, version_text: str = "0.1.0", authors: str = "unspecified",
                  copyright_text: str = "unspecified", overwrite: bool = False) -> Path:
    """Write the LDM run (folder or checkpoint) ``run``, and the ControlNet run ``controlnet`` trained on it, as a
    MONAI bundle in ``out``; returns ``out``.

    Args:
        overrides: ``--set`` overrides of the LDM's stored config (e.g. ``ldm.autoencoder_checkpoint`` when the
            autoencoder has moved).
        name, version_text, authors, copyright_text: the metadata's ``name``, ``version``, ``authors``, ``copyright``.
        overwrite: replace an ``out`` that exists (otherwise an error).

    Raises:
        FileNotFoundError: a run, checkpoint or the autoencoder is missing.
        ValueError: ``out`` exists (not empty) without ``overwrite``; ``run`` is not an LDM checkpoint;
            ``controlnet`` is not a ControlNet checkpoint, or one trained on other LDM weights.
    """
    log = get_logger()
    out = Path(out)
    if out.exists() and not overwrite and (out.is_file() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not empty; choose another folder or pass --overwrite")
    state = load_ldm_checkpoint(Path(run), kinds=("ldm", "controlnet"))
    if state["kind"] == "controlnet":
        raise ValueError(f"{state['path']} is a ControlNet checkpoint; export the LDM it steers with it: "
                         f"monai-diffusion export {state['ldm_checkpoint']} --controlnet {run} --format bundle OUT")
    checkpoint = Path(state["path"])
    run_dir = run_folder(checkpoint)
    config = config_from_dict(apply_overrides(state["config"], list(overrides or [])),
                              source=f"{checkpoint} (stored config)")
    config.device.compile = False
    cpu = torch.device("cpu")
    ldm = load_ldm(state, config, cpu)
    trained = ldm.trained
    spatial_dims = len(ldm.latent_shape) - 1
    conditioning = ldm.encoder.unet_arguments() if ldm.encoder is not None else None
    kind = trained.ldm.sampling.scheduler or trained.ldm.scheduler.type
    definitions = {
        "autoencoder": autoencoder_definition(trained.autoencoder, spatial_dims, use_checkpoint=False),
        "network": unet_definition(trained.ldm, ldm.latent_shape[0], spatial_dims, conditioning),
        "scheduler": scheduler_definition(trained.ldm.scheduler, kind, ldm.latent_shape),
    }
    weights = {"model.pt": ldm.unet.state_dict(), "autoencoder.pt": ldm.autoencoder.state_dict()}

    controlnet_state, controlnet_config = None, None
    if controlnet is not None:
        controlnet_state = load_ldm_checkpoint(Path(controlnet), kinds=("controlnet",))
        if controlnet_state["ldm_hash"] != ldm.weights_hash:
            raise ValueError(f"The ControlNet {controlnet_state['path']} was trained on other LDM weights "
                             f"({controlnet_state['ldm_hash']}) than those of {checkpoint} ({ldm.weights_hash}); "
                             f"export the LDM it was trained on ({controlnet_state['ldm_checkpoint']})")
        controlnet_config = config_from_dict(controlnet_state["config"],
                                             source=f"{controlnet_state['path']} (stored config)").controlnet
        definitions["controlnet"] = controlnet_definition(trained.ldm, controlnet_config, ldm.latent_shape[0],
                                                          spatial_dims, conditioning=conditioning)
        weights["controlnet.pt"] = (ema_weights(controlnet_state["ema"]) if controlnet_state.get("ema") is not None
                                    else controlnet_state["controlnet"])

    ae_state = autoencoder_checkpoint(ldm.record.autoencoder_checkpoint)
    ae_run = run_folder(ldm.record.autoencoder_checkpoint)
    ldm_report, ae_report = evaluation_of(run_dir), evaluation_of(ae_run)
    if ldm_report is not None and ldm_report.get("kind") != "ldm":
        ldm_report = None
    if ae_report is not None and ae_report.get("kind") != "autoencoder":
        ae_report = None

    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    try:
        for folder in ("configs", "models", "docs"):
            (tmp / folder).mkdir(parents=True)
        for file, state_dict in weights.items():
            torch.save({key: value.detach().cpu().contiguous() for key, value in state_dict.items()},
                       tmp / "models" / file)
        inference = inference_config(trained, ldm, definitions=definitions, controlnet_config=controlnet_config)
        meta = metadata(trained, ldm, name=name or f"{run_dir.name} latent diffusion", version_text=version_text,
                        authors=authors, copyright_text=copyright_text, run=run_dir,
                        controlnet_config=controlnet_config, metrics=eval_metrics(ldm_report, ae_report))
        (tmp / "configs" / "inference.json").write_text(json.dumps(inference, indent=4) + "\n")
        (tmp / "configs" / "metadata.json").write_text(json.dumps(meta, indent=4) + "\n")
        (tmp / "configs" / "logging.conf").write_text(LOGGING_CONF)
        configs = {"training_config.yaml": "the LDM run's config"}
        save_config(trained, tmp / "docs" / "training_config.yaml")
        if controlnet_state is not None:
            save_config(config_from_dict(controlnet_state["config"], source="ControlNet"),
                        tmp / "docs" / "controlnet_config.yaml")
            configs["controlnet_config.yaml"] = "the ControlNet run's config"
        for report, file in ((ldm_report, "evaluation_ldm.json"), (ae_report, "evaluation_autoencoder.json")):
            if report is not None:
                (tmp / "docs" / file).write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / "docs" / "README.md").write_text(readme(
            trained, ldm, meta=meta, run=run_dir, ae_step=ae_state.get("step"), controlnet_state=controlnet_state,
            ldm_report=ldm_report, autoencoder_report=ae_report, configs=configs))
        check_bundle(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote the bundle %s: %s (%s weights, step %d)%s", out, ", ".join(sorted(weights)), ldm.weights,
             ldm.step, f" with the ControlNet {controlnet_state['path']}" if controlnet_state is not None else "")
    return out


def check_bundle(folder: Path) -> None:
    """Build the bundle's sampler from its ``configs/inference.json`` on the CPU, every network with its weights from
    ``models/`` (every key, strictly): what ``monai.bundle run`` does before it generates.

    Raises:
        RuntimeError: a network's definition and its weights disagree.
    """
    parser = ConfigParser()
    parser.read_config(folder / "configs" / "inference.json")
    parser["bundle_root"] = str(folder)
    parser["device"] = "$torch.device('cpu')"
    parser.get_parsed_content("sampler")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path, help="LDM run folder (its checkpoints/best.pt, else last.pt) or checkpoint")
    parser.add_argument("--format", choices=FORMATS, required=True,
                        help="bundle: a MONAI bundle (configs/, models/, docs/; python -m monai.bundle run)")
    parser.add_argument("out", type=Path, help="the folder to write (must not exist, or be empty)")
    parser.add_argument("--controlnet", type=Path, default=None, metavar="RUN",
                        help="a ControlNet run (folder or checkpoint) trained on this LDM, exported with it")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the LDM's stored config, e.g. --set ldm.autoencoder_checkpoint=PATH "
                        "when the autoencoder has moved (repeatable)")
    parser.add_argument("--name", default=None, help="the bundle's name (default: '<run folder> latent diffusion')")
    parser.add_argument("--version", dest="version_text", default="0.1.0", help="the bundle's version (default 0.1.0)")
    parser.add_argument("--authors", default="unspecified", help="the metadata's authors")
    parser.add_argument("--copyright", dest="copyright_text", default="unspecified", help="the metadata's copyright")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monai-diffusion export", description=command_description(__doc__))
    add_arguments(parser)
    args = parser.parse_args(argv)
    return exit_status(lambda: export_bundle(
        args.run, args.out, controlnet=args.controlnet, overrides=args.overrides, name=args.name,
        version_text=args.version_text, authors=args.authors, copyright_text=args.copyright_text,
        overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
