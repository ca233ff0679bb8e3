"""Pixels: decoding, measurements, quality checks, augmentation."""
