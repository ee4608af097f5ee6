"""adaspec: selective knowledge distillation of speculative-decoding drafts from a logit cache."""

__version__ = "0.1.0"
