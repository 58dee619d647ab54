"""Input pipeline: sources (synthetic, LLaVA JSON, tfds) -> grain -> fixed-shape batches. Entry points: pipeline.py."""
