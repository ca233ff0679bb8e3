"""Using a trained model: the model file, inference without Lightning, output formats, export."""
