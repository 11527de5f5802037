"""``monai-diffusion sample``: generate volumes with a trained latent diffusion model (NIfTI + PNG panel).

The options name the checkpoint, the number of samples, steps, sampler, seed and output folder;
:func:`monai_diffusion.generation.sample` does the rest: load the LDM and the autoencoder it was trained on, then for
each sample denoise seeded noise with DDPM / DDIM / rectified flow, decode, clip to the training intensity range and
write ``sample-NNN.nii.gz`` and ``sample-NNN.png``. The networks are built from the checkpoint's own config; a
``--config`` (or a ``--set``) whose network-shaping keys differ from it is refused, listing both values.

A conditional LDM samples with ``--condition KEY=VALUE`` (repeatable; every sample gets them) or ``--conditions
TABLE.csv`` (one row per sample, one column per condition), guided by ``--guidance W``; ``--mask LABEL_MAP.nii.gz``
samples a ControlNet run (train-controlnet) so that the volume follows the map, in its space. Those samples are
named after their seed and conditions, which ``samples.csv`` and each file's NIfTI description also record. MAISI's
UNet also takes ``--spacing X Y Z`` (mm; default the training data's) and ``--modality NAME`` (default the run's).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from monai_diffusion import command_description
from monai_diffusion.conditioning import parse_condition_args, read_condition_table
from monai_diffusion.config.arguments import add_config_arguments, config_from_args
from monai_diffusion.engine.logging import exit_status
from monai_diffusion.generation import sample
from monai_diffusion.networks.builders import CONTROLNET_SHAPE_KEYS, LDM_SHAPE_KEYS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--num-samples", "-n", type=int, default=None, help="volumes to generate (default: ldm.sampling.num_samples)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: ldm.sampling.num_inference_steps)")
    parser.add_argument("--scheduler", choices=["ddpm", "ddim", "rflow"], default=None,
                        help="sampler (default: ldm.sampling.scheduler, else the training scheduler)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's seed)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <LDM run>/generated)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="LDM (or, with --mask, ControlNet) checkpoint or run folder (default: the newest "
                        "<output_dir>/ldm-*/checkpoints/last.pt, with --mask <output_dir>/controlnet-*/...)")
    conditions = parser.add_mutually_exclusive_group()
    conditions.add_argument("--condition", action="append", default=[], metavar="KEY=VALUE",
                            help="a condition of a conditional LDM for every sample, e.g. --condition age=70 "
                            "(repeatable; give each condition the LDM was trained with, or none for unconditional "
                            "samples)")
    conditions.add_argument("--conditions", type=Path, default=None, metavar="TABLE.csv",
                            help="a CSV with one column per condition and one row per sample")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale: 1 the plain conditional model, above 1 following the "
                        "conditions more strongly (default: ldm.sampling.guidance_scale)")
    parser.add_argument("--mask", type=Path, default=None, metavar="LABEL_MAP.nii.gz",
                        help="a label map the samples follow (a ControlNet run; the samples take its affine)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="MAISI's UNet (ldm.unet.architecture maisi): the voxel spacing in mm to generate at, "
                        "also written to the samples' affine (default: the training data's, or the mask's)")
    parser.add_argument("--modality", default=None, metavar="NAME",
                        help="MAISI's UNet: the samples' modality, a name of MAISI's vocabulary, e.g. ct, mri_t1 "
                        "(default: ldm.unet.modality of the run, or its training split's most frequent)")


def keys_to_match(config_file: str | None, overrides: list[str], shape_keys: list[str] = LDM_SHAPE_KEYS) -> list[str]:
    """The network-shaping keys the command line states, which must then be the checkpoint's: all of them when a
    config file is given, else those a ``--set`` names (itself or a section above it). Without either, the
    checkpoint's own settings are used and nothing is compared. ``shape_keys``: the LDM's, or a ControlNet's
    (``--mask``)."""
    if config_file is not None:
        return list(shape_keys)
    named = [override.split("=", 1)[0].strip() for override in overrides]
    return [key for key in shape_keys if any(key == name or key.startswith(f"{name}.") for name in named)]


def condition_rows(args: argparse.Namespace, num_samples: int) -> tuple[list[dict] | None, list[str] | None]:
    """One row of conditions per sample and where each came from: the table's rows, or ``--condition``'s values for
    every one of ``num_samples`` samples; (None, None) without conditions."""
    if args.conditions is not None:
        return read_condition_table(args.conditions)
    if args.condition:
        return [parse_condition_args(args.condition)] * num_samples, ["--condition"] * num_samples
    return None, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monai-diffusion sample", description=command_description(__doc__))
    add_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("num_samples", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.guidance is not None and args.guidance < 0:
        parser.error("--guidance must be >= 0")
    if args.spacing is not None and any(not value > 0 for value in args.spacing):
        parser.error("--spacing must be three positive numbers (mm)")
    config = config_from_args(args, to_run=False)  # no autoencoder trains here

    def generate() -> None:
        rows, where = condition_rows(args, args.num_samples or config.ldm.sampling.num_samples)
        sample(config, args.num_samples, args.steps, args.scheduler, seed=args.seed, out=args.out,
               checkpoint=args.checkpoint,
               shape_keys=keys_to_match(args.config, args.overrides,
                                        CONTROLNET_SHAPE_KEYS if args.mask else LDM_SHAPE_KEYS),
               conditions=rows, where=where, guidance=args.guidance, mask=args.mask, spacing=args.spacing,
               modality=args.modality)

    return exit_status(generate)


if __name__ == "__main__":
    sys.exit(main())
