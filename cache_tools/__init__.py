"""cache_tools: an offline-distillation logit cache in Zarr v3 (no torch, no transformers)."""
