"""The Lightning wiring: a thin LightningModule over the engine, the DataModule, the CLI."""
