"""Which images, with which labels, in which role: listing, ingest, the index, splits, image settings."""
