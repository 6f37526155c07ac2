"""LightningModules, one per objective; every stage is one of them plus configuration."""
