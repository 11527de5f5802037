"""Check AutoencoderKL's per-level downsampling: the seed's scenarios, or your own config.

    python tools/test_downsample_factors.py                      # all scenarios
    python tools/test_downsample_factors.py --size 256 256 64    # forward/backward at the seed's size (needs memory)
    python tools/test_downsample_factors.py --config config/examples/ldm_config_8x_downsample.yaml
    python tools/test_downsample_factors.py --device cuda

Each scenario builds the network and prints, at the seed's volume size 256x256x64, the expected latent shape
(each size divided by the product of its axis' factors) beside the network's own (``latent_shape``), the parameter
count and a memory analysis: these come from arithmetic, nothing runs. It then runs a forward and backward pass at a
small size (64x64x32, or ``--size``) and checks the shapes and gradients there. With ``--config`` the same is done
for the config's autoencoder at its ``data.voxel_size``. Exit status 1 if any scenario fails.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets import AutoencoderKL as MonaiAutoencoderKL

from monai_diffusion.config import ConfigError, load_config
from monai_diffusion.networks import AutoencoderKL
from monai_diffusion.networks.builders import build_autoencoder

# The seed's volume size: the shapes, parameter counts and memory analysis are given at it.
SEED_SIZE = (256, 256, 64)
# Forward and backward passes run at this size unless --size says otherwise (seconds on a CPU).
CHECK_SIZE = (64, 64, 32)


@dataclass
class Scenario:
    title: str
    channels: tuple[int, ...]
    factors: list | None
    size: tuple[int, ...] | None = None  # None: SEED_SIZE for the analysis, CHECK_SIZE / --size for the passes
    expect_error: str | None = None  # substring of the ValueError a rejected setting must raise
    compare_monai: bool = False


SCENARIOS = [
    Scenario("4x downsampling - default (factors None = [2, 2])", (16, 32, 64), None),
    Scenario("8x downsampling - recommended", (16, 32, 64), [4, 2]),
    Scenario("16x downsampling - extreme", (16, 32, 64), [8, 2]),
    Scenario("16x downsampling - two gentle steps", (16, 32, 64), [4, 4]),
    Scenario("16x downsampling - single level", (16, 64), [16]),
    Scenario("anisotropic per-axis factors (thick slices: less along z)", (16, 32, 64), [[4, 4, 2], [2, 2, 2]]),
    Scenario("MONAI equivalence at [2, 2]", (16, 32, 64), [2, 2], compare_monai=True),
    Scenario("invalid: wrong number of factors", (16, 32, 64), [4, 2, 2], expect_error="downsample_factors"),
    Scenario("invalid: factor 0", (16, 32, 64), [4, 0], expect_error="downsample_factors"),
    Scenario("invalid: per-axis factor of the wrong length", (16, 32, 64), [[4, 4], 2], expect_error="spatial_dims"),
    Scenario("invalid: size not divisible by the total factor", (16, 32, 64), [4, 2], size=(60, 64, 32),
             expect_error="not divisible"),
]


def mib(elements: int, bytes_per_element: int = 4) -> str:
    return f"{elements * bytes_per_element / 2**20:.3f} MiB"


def make_autoencoder(channels, factors, **kwargs) -> AutoencoderKL:
    return AutoencoderKL(
        spatial_dims=3, channels=channels, downsample_factors=factors, latent_channels=3, num_res_blocks=1,
        attention_levels=(False,) * len(channels), norm_num_groups=8, **kwargs,
    )


def expected_latent(factors: tuple[tuple[int, ...], ...], size: tuple[int, ...]) -> tuple[int, ...]:
    """Each size divided by the product of its axis' factors, written out here so the network is checked against
    arithmetic it does not share."""
    return tuple(s // math.prod(level[axis] for level in factors) for axis, s in enumerate(size))


def analyse(autoencoder: AutoencoderKL, size: tuple[int, ...], in_channels: int = 1) -> list[str]:
    """Shapes, parameters and memory at ``size`` from the network's arithmetic (nothing runs); returns failures."""
    expected = expected_latent(autoencoder.downsample_factors, size)
    actual = autoencoder.latent_shape(size)
    params = sum(p.numel() for p in autoencoder.parameters())
    image_elements = in_channels * math.prod(size)
    latent_elements = autoencoder.latent_channels * math.prod(actual)
    print(f"  at {'x'.join(map(str, size))} (shapes from the network's arithmetic, nothing runs)")
    print(f"  total factor      {'x'.join(map(str, autoencoder.total_factor))} (per axis)")
    print(f"  expected latent   {expected}")
    print(f"  actual latent     {actual}  (network.latent_shape)")
    print(f"  parameters        {params:,}  (weights, gradients and AdamW state: {mib(params, 16)})")
    print(
        f"  memory analysis   input {mib(image_elements)} (float32), latent {mib(latent_elements)}; "
        f"compression {image_elements:,} -> {latent_elements:,} elements = {image_elements / latent_elements:.1f}x"
    )
    return [] if actual == expected else [f"latent {actual} != expected {expected} at {size}"]


def check_network(autoencoder: torch.nn.Module, size: tuple[int, ...], device: torch.device,
                  in_channels: int = 1) -> list[str]:
    """A forward + backward pass at ``size``: latent shape, reconstruction shape, gradients; returns failures."""
    failures = []
    expected = expected_latent(autoencoder.downsample_factors, size)
    print(f"  forward/backward at {'x'.join(map(str, size))}")
    print(f"  expected latent   {expected}")
    autoencoder = autoencoder.to(device)
    images = torch.rand(1, in_channels, *size, device=device)
    start = time.perf_counter()
    reconstruction, z_mu, z_sigma = autoencoder(images)
    loss = F.l1_loss(reconstruction, images) + 1e-6 * (z_mu.pow(2) + z_sigma.pow(2)).mean()
    loss.backward()
    elapsed = time.perf_counter() - start
    print(f"  actual latent     {tuple(z_mu.shape[2:])}  (network.latent_shape: {autoencoder.latent_shape(size)})")
    print(f"  forward+backward  ok in {elapsed:.2f} s, reconstruction {tuple(reconstruction.shape)}")
    if tuple(z_mu.shape[2:]) != expected or autoencoder.latent_shape(size) != expected:
        failures.append(f"latent {tuple(z_mu.shape[2:])} != expected {expected}")
    if reconstruction.shape != images.shape:
        failures.append(f"reconstruction {tuple(reconstruction.shape)} != input {tuple(images.shape)}")
    if not all(p.grad is not None and torch.isfinite(p.grad).all() for p in autoencoder.parameters()):
        failures.append("some parameters got no or non-finite gradients")
    image_elements, latent_elements = math.prod(images.shape), math.prod(z_mu.shape)
    print(
        f"  memory analysis   input {mib(image_elements)} (float32), latent {mib(latent_elements)}; "
        f"compression {image_elements:,} -> {latent_elements:,} elements = {image_elements / latent_elements:.1f}x"
    )
    return failures


def run_scenario(number: int, scenario: Scenario, check_size: tuple[int, ...] | None, device: torch.device) -> bool:
    size = scenario.size or SEED_SIZE
    print(f"\nTest {number}: {scenario.title}")
    print(f"  channels {scenario.channels}   downsample_factors {scenario.factors}   batch 1")
    try:
        autoencoder = make_autoencoder(scenario.channels, scenario.factors)
        if scenario.expect_error:
            autoencoder.latent_shape(size)
    except ValueError as exc:
        if scenario.expect_error and scenario.expect_error in str(exc):
            print(f"  input size        {size}")
            print(f"  rejected as it must be: {exc}")
            print("  PASS")
            return True
        print(f"  FAIL: unexpected error: {exc}")
        return False
    if scenario.expect_error:
        print(f"  FAIL: accepted, but must be rejected with an error mentioning '{scenario.expect_error}'")
        return False
    failures = analyse(autoencoder, size)
    torch.manual_seed(0)
    check_size = check_size or CHECK_SIZE
    failures += check_network(autoencoder, check_size, device)
    if scenario.compare_monai:
        monai = MonaiAutoencoderKL(
            spatial_dims=3, channels=scenario.channels, latent_channels=3, num_res_blocks=1,
            attention_levels=(False,) * len(scenario.channels), norm_num_groups=8,
        ).to(device)
        monai.load_state_dict(autoencoder.state_dict(), strict=True)
        images = torch.rand(1, 1, *check_size, device=device)
        with torch.no_grad():
            difference = (monai.reconstruct(images) - autoencoder.eval().reconstruct(images)).abs().max().item()
        print(f"  MONAI AutoencoderKL: state dict loads strictly, max |difference| of reconstructions {difference:.2e}")
        if difference > 1e-4:
            failures.append(f"differs from MONAI by {difference}")
    print("  PASS" if not failures else f"  FAIL: {'; '.join(failures)}")
    return not failures


def small_size(total_factor: tuple[int, ...]) -> tuple[int, ...]:
    """CHECK_SIZE rounded per axis to a multiple of the total factor (at least one factor)."""
    return tuple(max(f, s // f * f) for s, f in zip(CHECK_SIZE, total_factor))


def check_config(path: str, overrides: list[str], device: torch.device, check_size: tuple[int, ...] | None) -> bool:
    try:
        config = load_config(path, overrides)
    except ConfigError as exc:
        print(exc)
        return False
    size = tuple(config.data.voxel_size)
    print(f"\nConfig {path}")
    print(f"  channels {config.autoencoder.num_channels}   downsample_factors "
          f"{config.autoencoder.downsample_factors}   batch {config.autoencoder.training.batch_size}")
    try:
        autoencoder = build_autoencoder(config.autoencoder, len(size))
        in_channels = config.autoencoder.in_channels
        failures = analyse(autoencoder, size, in_channels)
        failures += check_network(autoencoder, check_size or small_size(autoencoder.total_factor), device, in_channels)
    except ValueError as exc:
        failures = [str(exc)]
    print("  PASS" if not failures else f"  FAIL: {'; '.join(failures)}")
    return not failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                        help="volume size for the forward/backward passes (default 64 64 32, with --config rounded "
                        "to the total factor); shapes and memory are given at 256x256x64 (with --config: "
                        "data.voxel_size) either way")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--config", default=None, help="check this config's autoencoder instead of the scenarios")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, with --config")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.config:
        return 0 if check_config(args.config, args.overrides, device, tuple(args.size) if args.size else None) else 1
    check_size = tuple(args.size) if args.size else None
    results = [run_scenario(i, s, check_size, device) for i, s in enumerate(SCENARIOS, start=1)]
    print(f"\n{sum(results)} passed, {len(results) - sum(results)} failed")
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
