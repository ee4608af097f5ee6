"""cache_tools: an offline-distillation logit cache stored as Zarr v3 (no torch.nn, no transformers)."""
