"""The command-line options every command shares: ``--config FILE`` and repeatable ``--set a.b=value``."""

from __future__ import annotations

import argparse
import sys

from monai_diffusion.config.loading import ConfigError, load_config
from monai_diffusion.config.schema import Config


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config (default: built-in defaults)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, value parsed as YAML, e.g. --set autoencoder.downsample_factors=[4,2] "
        "(repeatable)",
    )


def config_from_args(args: argparse.Namespace, *, to_run: bool = True) -> Config:
    """Load and validate the config named on the command line; on errors print them all and exit 2. ``to_run`` as
    in :func:`~monai_diffusion.config.loading.load_config`."""
    try:
        return load_config(args.config, args.overrides, to_run=to_run)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def add_resume_argument(parser: argparse.ArgumentParser, run_kind: str) -> None:
    """``--resume false|auto|true|PATH`` for a training command whose runs are ``<output_dir>/<run_kind>-*``."""
    parser.add_argument(
        "--resume",
        default="false",
        help=f"false (default): new run; auto: newest {run_kind} run's last checkpoint if any; "
        "true: the same but an error if there is none; PATH: a checkpoint file or run folder",
    )
