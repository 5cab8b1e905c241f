"""`latentlab-cli`: Lightning's own `LightningCLI` over latentlab's models and data modules (see `lightning_cli`)."""

from latentlab.cli.lightning_cli import LatentlabCLI, build_cli, hydra_layout, main

__all__ = ["LatentlabCLI", "build_cli", "hydra_layout", "main"]
