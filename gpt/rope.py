"""Rotary position embedding: rotate each pair of query/key dims by an angle proportional to the
token's position, so that the dot product q·k depends only on the positions' difference.

Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", arXiv 2104.09864.

    θ_i = base^(-2i/d)                  i = 0 .. d/2-1, d = rotated dims of a head
    (x1, x2) at position m  ->  (x1 cos mθ_i - x2 sin mθ_i,  x1 sin mθ_i + x2 cos mθ_i)
    <R_m q, R_n k> = <q, R_(n-m) k>     scores depend on n - m only

Pairs are (x[i], x[i + d/2]) ("half-split", as in GPT-NeoX and Llama). With partial rotation only
the first d = rotary_dims dims of each head turn; the rest pass through untouched.
The cos/sin tables are built once in fp32 for positions 0 .. block_size-1 and move with the module;
casting the model (to bf16, say) leaves them fp32. The rotation itself is computed in fp32.
Config: pos="rope", rope_base, rope_fraction.
"""

import torch
from torch import nn


class Rotary(nn.Module):
    """Rotates the first `rotary_dims` dims of each head; tables for positions 0 .. max_len-1."""

    def __init__(self, rotary_dims, base=10000.0, max_len=1024):
        super().__init__()
        if rotary_dims % 2 or rotary_dims < 2:
            raise ValueError(f"rotary_dims must be a positive even number, got {rotary_dims}")
        self.rotary_dims, self.base, self.max_len = rotary_dims, base, max_len
        self._build(torch.get_default_device())

    def _build(self, device):
        """The cos/sin tables (L, d/2), built once. The angles m θ_i are formed in fp64: in fp32 an
        angle of 4000 rad is off by up to 2e-4, which would break the shift invariance at long
        contexts; the tables are then stored in fp32. (Built on the CPU: MPS has no fp64.)"""
        d = self.rotary_dims
        inv_freq = self.base ** (-torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d)  # (d/2,)
        angles = torch.outer(torch.arange(self.max_len, dtype=torch.float64, device="cpu"), inv_freq)
        self.register_buffer("inv_freq", inv_freq.float().to(device), persistent=False)
        self.register_buffer("cos", angles.cos().float().to(device), persistent=False)  # (L, d/2), fp32
        self.register_buffer("sin", angles.sin().float().to(device), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # model.to(device) moves the tables; model.to(torch.bfloat16) or .half() would round them to
        # 3 significant digits, so they are rebuilt in fp32 on the new device instead.
        super()._apply(fn, *args, **kwargs)
        if self.cos.dtype != torch.float32:
            self._build(self.cos.device)
        return self

    def forward(self, x, pos):
        """x: (B, nh, T, hs); pos: (T,) or (B, T) absolute positions. Returns x rotated, same dtype."""
        cos, sin = self.cos[pos], self.sin[pos]  # (T, d/2) or (B, T, d/2)
        if pos.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, d/2)
        return apply_rotary(x, cos, sin, self.rotary_dims)


def apply_rotary(x, cos, sin, rotary_dims):
    """Rotate the first `rotary_dims` dims of x's last axis; cos/sin broadcast against (..., T, d/2)."""
    half = rotary_dims // 2
    x1, x2, rest = x[..., :half], x[..., half:rotary_dims], x[..., rotary_dims:]
    x1f, x2f = x1.float(), x2.float()
    y1 = x1f * cos - x2f * sin
    y2 = x1f * sin + x2f * cos
    return torch.cat([y1.type_as(x), y2.type_as(x), rest], dim=-1)
