"""cogtune: LoRA fine-tuning for CogVideoX from precomputed latent caches.

The pipeline, in the order data flows through it:
sources -> video -> preprocess -> data_schema (the cache) -> train -> infer.
"""

__version__ = "0.1.0"
