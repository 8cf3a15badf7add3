"""NeuroMF: MeanFlow latent synthesis of 3D FLAIR MRI with FCD lesion masks (headless backend, no Qt)."""

__version__ = "0.1.0"
