"""``monai-diffusion <command>``: one subcommand per module, each also runnable as ``python -m``."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help). Modules are imported only when their command runs: keeps --help fast.
COMMANDS = {
    "validate": ("monai_diffusion.validate", "check a config and print what it builds"),
    "train-autoencoder": ("monai_diffusion.train_autoencoder", "train the 3D AutoencoderKL"),
    "train-ldm": ("monai_diffusion.train_ldm", "train the latent diffusion UNet"),
    "train-controlnet": ("monai_diffusion.train_controlnet", "train a ControlNet that makes the LDM follow label maps"),
    "sample": ("monai_diffusion.sample", "generate volumes (NIfTI + PNG)"),
    "evaluate": ("monai_diffusion.evaluate", "score a trained autoencoder or LDM run against baselines"),
    "benchmark": ("monai_diffusion.memory.benchmark", "measure peak memory and step time"),
    "plan": ("monai_diffusion.memory.plan", "predict memory for a config and propose a fitting change"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="monai-diffusion", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help() if not argv or argv[0] in ("-h", "--help") else parser.error(
            f"unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}"
        )
        return 0
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
