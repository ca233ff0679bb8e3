"""Test helpers shared by the test files: image factories, workflow runs, a local SLURM, a headless browser, model factories."""
