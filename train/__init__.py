"""Training: Hydra entry point, LightningModule, evaluation, strategies and CLIs."""
