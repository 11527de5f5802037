"""``monai-diffusion sample``: generate volumes with a trained latent diffusion model (NIfTI + PNG panel).

The options name the checkpoint, the number of samples, steps, sampler, seed and output folder;
:func:`monai_diffusion.generation.sample` does the rest: load the LDM and the autoencoder it was trained on, then for
each sample denoise seeded noise with DDPM / DDIM / rectified flow, decode, clip to the training intensity range and
write ``sample-NNN.nii.gz`` and ``sample-NNN.png``. The networks are built from the checkpoint's own config; a
``--config`` (or a ``--set``) whose network-shaping keys differ from it is refused, listing both values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from monai_diffusion.config.arguments import add_config_arguments, config_from_args
from monai_diffusion.engine.logging import get_logger
from monai_diffusion.generation import sample
from monai_diffusion.networks.builders import LDM_SHAPE_KEYS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--num-samples", "-n", type=int, default=None, help="volumes to generate (default: ldm.sampling.num_samples)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: ldm.sampling.num_inference_steps)")
    parser.add_argument("--scheduler", choices=["ddpm", "ddim", "rflow"], default=None,
                        help="sampler (default: ldm.sampling.scheduler, else the training scheduler)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's seed)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <LDM run>/generated)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="LDM checkpoint or run folder (default: newest <output_dir>/ldm-*/checkpoints/last.pt)")


def keys_to_match(config_file: str | None, overrides: list[str]) -> list[str]:
    """The network-shaping keys the command line states, which must then be the checkpoint's: all of them when a
    config file is given, else those a ``--set`` names (itself or a section above it). Without either, the
    checkpoint's own settings are used and nothing is compared."""
    if config_file is not None:
        return list(LDM_SHAPE_KEYS)
    named = [override.split("=", 1)[0].strip() for override in overrides]
    return [key for key in LDM_SHAPE_KEYS if any(key == name or key.startswith(f"{name}.") for name in named)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="monai-diffusion sample", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    for name in ("num_samples", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    config = config_from_args(args)
    try:
        sample(config, args.num_samples, args.steps, args.scheduler, args.seed, args.out, args.checkpoint,
               keys_to_match(args.config, args.overrides))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        get_logger().error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
