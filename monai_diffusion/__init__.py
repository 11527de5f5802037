"""monai-diffusion: config-driven 3D latent diffusion for medical volumes."""

__version__ = "0.1.0"
