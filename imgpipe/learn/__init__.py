"""Models and their training: builders, the LightningModule and DataModule, fit, jobs, sweep, CV, metrics."""
