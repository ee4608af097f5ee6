"""Cheaper decoding forwards on a CPU: every `nn.Linear` as a oneDNN linear with its weight
prepacked once.

Why: speculative decoding's target verifies g + 1 tokens per step, and on a CPU the cost of
that forward, not the draft's, decides whether a draft pays. PyTorch's default CPU matmul
(MKL sgemm) handles 2 or 3 rows as slowly as 2 or 3 separate single-token forwards and 4-8 rows
at 1.3-1.6 of one (SmolLM2-135M, 2 cores: 65 ms for one token, 112 / 132 / 95 / 86 ms for 2 / 3
/ 4 / 5). With the weights prepacked for oneDNN (`torch.utils.mkldnn.MkldnnLinear`) the same
forwards take 59 ms and 72 / 79 / 75 / 78 ms (`bench/verify_cost.py` measures it). Target-only
decoding gets the same treatment, so a speedup stays a like-for-like ratio.

The outputs are the same function computed with another summation order (differences of order
1e-4 in the logits of the embedded model, no argmax changed on the prompts checked): used for
decoding speed only, never for teacher-forced measures or training.
"""

from __future__ import annotations

import warnings

import torch


def available(model) -> bool:
    """oneDNN linears serve fp32 models on the CPU (and need PyTorch built with oneDNN)."""
    try:
        param = next(model.parameters())
    except StopIteration:
        return False
    return (torch.backends.mkldnn.is_available() and param.device.type == "cpu"
            and param.dtype == torch.float32)


def prepack_linears(model) -> int:
    """Replace every `nn.Linear` of `model` (in place) by a oneDNN linear holding a prepacked
    copy of its weight; returns how many were replaced. Tied weights (an LM head sharing the
    embedding) get their own packed copy; the model is for inference only afterwards."""
    from torch.utils.mkldnn import MkldnnLinear

    replaced = 0
    with warnings.catch_warnings():  # MkldnnLinear is a ScriptModule: a deprecation warning
        warnings.simplefilter("ignore", DeprecationWarning)
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(module, name, MkldnnLinear(child, torch.float32))
                    replaced += 1
    return replaced
