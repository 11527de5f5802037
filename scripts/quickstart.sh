#!/usr/bin/env bash
# Quickstart: install into .venv, train the autoencoder and the LDM on the demo brains, sample one volume.
# CPU: about 10 minutes on 2 cores (plus the install). Outputs land in runs/ (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh  # .venv with PyTorch (CPU unless one is installed) and the project; tests reuse it
. .venv/bin/activate
monai-diffusion train-autoencoder --config config/examples/quickstart.yaml "$@"
monai-diffusion train-ldm --config config/examples/quickstart.yaml "$@"
monai-diffusion sample --config config/examples/quickstart.yaml --num-samples 1 --seed 0 "$@"
echo "Done. Reconstructions: runs/autoencoder-*/images/  generated volume: runs/ldm-*/generated/  logs: tensorboard --logdir runs"
