"""mergeflow: keep one merged model current as fine-tuned checkpoints arrive."""

__version__ = "0.1.0"
