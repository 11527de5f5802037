"""Memory and speed: measuring the training steps (``probe``) and the data pipeline (``throughput``), the
``benchmark`` command and the ``plan`` command.

``probe`` builds a config's step with the recipes' own builders and measures it; both commands drive it and
import nothing from each other. ``throughput`` times the training loaders for ``benchmark --suite loader``.
"""
