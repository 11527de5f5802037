"""Loaded at start-up by the commands the tests run (this folder is on their PYTHONPATH): installs the stop-signal
fixture (tests/signal_hook.py) when a test asked for one."""

import os
import sys

if os.environ.get("MONAI_DIFFUSION_TEST_SIGNAL"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import signal_hook

    signal_hook.install()
