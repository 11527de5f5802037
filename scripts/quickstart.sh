#!/usr/bin/env bash
# Quickstart: install into .venv, train the autoencoder (8x: factors [4, 2]) and the LDM on the demo brains, score the
# autoencoder against trilinear resampling, sample two volumes. CPU: under 10 minutes on 2 cores (plus the install).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh  # .venv with PyTorch (CPU unless one is installed) and the project; tests reuse it
. .venv/bin/activate
config=config/examples/quickstart.yaml
output=$(python - "$config" "$@" <<'PY'
import sys
from monai_diffusion.config import load_config
args = sys.argv[2:]
print(load_config(sys.argv[1], [args[i + 1] for i in range(len(args) - 1) if args[i] == "--set"]).output.output_dir)
PY
)
newest() { ls -dt "$output"/"$1"-* 2>/dev/null | head -n 1; }
monai-diffusion train-autoencoder --config "$config" "$@"
autoencoder_run=$(newest autoencoder)
monai-diffusion evaluate "$autoencoder_run"
monai-diffusion train-ldm --config "$config" "$@"
ldm_run=$(newest ldm)
monai-diffusion sample --config "$config" --checkpoint "$ldm_run" --num-samples 2 --seed 0 "$@"
cat <<DONE

Done. Where to look:
  autoencoder vs trilinear resampling  $autoencoder_run/evaluation/summary.md  (panels: reconstruction-best.png, -worst.png)
  reconstructions during training      $autoencoder_run/images/
  generated volumes (NIfTI + PNG)      $ldm_run/generated/
  training curves                      tensorboard --logdir $output
DONE
