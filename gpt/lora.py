"""LoRA: fine-tune a frozen linear layer through a trainable update of low rank, then fold it back in.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv 2106.09685.

    y = x W^T + b + (alpha / r) (x A^T) B^T      W, b frozen; A: (r, in) random, B: (out, r) zeros
    merge:  W <- W + (alpha / r) B A              after which the layer is a plain nn.Linear again

B starts at zero, so a fresh adapter changes nothing; only r (in + out) numbers per layer train.

Model surgery, like bitnet.py: `apply(model, rank, alpha, targets)` swaps in place every nn.Linear
whose name ends with one of `targets` (e.g. "mixer.c_attn" for every layer's fused q, k, v
projection) for a `LoRALinear` that shares its weight and bias, and freezes everything but the
adapters; `merge(model)` folds each adapter into its weight and puts the nn.Linear back, so the saved
checkpoint is an ordinary model. Not a config field: nothing that is saved carries an adapter.
Used by linearize.py (LoLCATs' stage 2: rank 8, alpha 16 on the q, k, v and output projections).
"""

import math

import torch
from torch import nn


class LoRALinear(nn.Linear):
    """A frozen nn.Linear (its weight and bias, shared, under the same names) plus the adapter
    lora_A: (rank, in), lora_B: (out, rank), scaled by alpha / rank."""

    def __init__(self, linear, rank, alpha):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight, self.bias = linear.weight, linear.bias
        w = linear.weight
        self.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as peft does
        self.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=w.device, dtype=w.dtype))
        self.scale = alpha / rank

    def forward(self, x):
        return super().forward(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scale  # (..., out)

    def merged(self):
        """The plain nn.Linear with W + scale B A."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        with torch.no_grad():
            out.weight = nn.Parameter(self.weight + self.scale * (self.lora_B @ self.lora_A))
        out.bias = self.bias
        return out


def _swap(model, kind, make):
    """Replace each submodule of type `kind` for which make(name, module) gives a module."""
    for name, module in list(model.named_modules()):
        if isinstance(module, kind):
            new = make(name, module)
            if new is not None:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, new)


def apply(model, rank=8, alpha=16, targets=("mixer.c_attn", "mixer.c_proj")):
    """Put adapters on the nn.Linear layers of `model` named ...target; freeze every other parameter.
    Returns the adapters' parameters (what the optimizer trains)."""
    model.requires_grad_(False)
    _swap(model, nn.Linear, lambda name, m: LoRALinear(m, rank, alpha)
          if name.endswith(tuple(targets)) and not isinstance(m, LoRALinear) else None)
    params = [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]
    if not params:
        raise ValueError(f"no nn.Linear named ...{' or ...'.join(targets)} in the model: nothing to adapt")
    return params


def merge(model):
    """Fold every adapter into its weight, LoRALinear -> nn.Linear, in place. Returns the model."""
    _swap(model, LoRALinear, lambda name, m: m.merged())
    return model
