"""``python -m monai_diffusion <command>``: the same as ``monai-diffusion <command>``."""

import sys

from monai_diffusion.cli import main

sys.exit(main())
