#!/usr/bin/env bash
# Quickstart: install into .venv, train the autoencoder and the LDM on the demo brains, sample one volume.
# CPU: about 10 minutes on 2 cores (plus the install). Outputs land in runs/ (see the README).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d .venv ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# A CPU build of PyTorch unless one is installed already (install your CUDA build first on a GPU machine).
python -c "import torch" 2>/dev/null || python -m pip install --quiet torch==2.13.0 \
  || python -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
python -m pip install --quiet -e .
monai-diffusion train-autoencoder --config config/examples/quickstart.yaml "$@"
monai-diffusion train-ldm --config config/examples/quickstart.yaml "$@"
monai-diffusion sample --config config/examples/quickstart.yaml --num-samples 1 --seed 0 "$@"
echo "Done. Reconstructions: runs/autoencoder-*/images/  generated volume: runs/ldm-*/generated/  logs: tensorboard --logdir runs"
