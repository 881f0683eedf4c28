"""Causal self-attention with its KV cache, and `attend()`: the one function that picks the kernel.

Vaswani et al., "Attention Is All You Need", arXiv 1706.03762.

    q, k, v = x W_q, x W_k, x W_v                   split into n_head heads of head_dim hs
    y_h = softmax(q_h k_h^T / sqrt(hs) + M) v_h     M = 0 where key pos <= query pos, else -inf
    y = concat_h(y_h) W_o

Kernels, in the order `attend()` tries them: `flash_attn` (when the package is importable and the
tensors are fp16/bf16 on a GPU; not installable on our machines, so that branch is unverified
here), then PyTorch's `scaled_dot_product_attention` with `is_causal=True` (its flash/cuDNN kernels
on a GPU) for the plain training case, then SDPA with an explicit boolean mask built from the
positions of queries and keys (decoding against a cache, routed subsets of tokens).
Config: n_head, n_embd, bias, dropout; the letter G in `layers`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from gpt.rope import Rotary

try:  # optional fast path: https://github.com/Dao-AILab/flash-attention
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def attend(q, k, v, q_pos=None, k_pos=None, dropout=0.0):
    """Causal attention of q over k, v.

    q: (B, nh, T, hs); k, v: (B, nkv, S, hs) with nh a multiple of nkv (query head h reads KV head
    h // (nh // nkv)). With q_pos=k_pos=None the T queries and S=T keys are the same positions in
    order (training, prefill from empty). Otherwise q_pos: (T,) or (B, T) and k_pos: (S,) or (B, S)
    are absolute positions and query i sees key j iff k_pos[j] <= q_pos[i]. Returns (B, nh, T, hs).
    """
    if q_pos is None:
        if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                dropout_p=dropout, causal=True)  # (B, T, nh, hs)
            return y.transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                              enable_gqa=k.shape[1] != q.shape[1])
    mask = k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1)  # (T, S) or (B, T, S)
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)  # (B, 1, T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                          enable_gqa=k.shape[1] != q.shape[1])


class KVCache:
    """Keys and values of the tokens seen so far, preallocated to max_len: (B, nkv, max_len, hs)."""

    def __init__(self, batch_size, max_len, n_kv_head, head_dim, device, dtype):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def append(self, k, v):
        """Store k, v: (B, nkv, T, hs); return all keys and values so far: (B, nkv, length, hs)."""
        T = k.shape[2]
        if self.length + T > self.k.shape[2]:
            raise ValueError(f"KV cache full: {self.length} + {T} tokens > max_len {self.k.shape[2]}")
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def nbytes(self):
        return self.k.nbytes + self.v.nbytes


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.residual = True  # scaled init (model.py)
        self.rotary = (Rotary(config.rotary_dims, config.rope_base, config.block_size)
                       if config.pos == "rope" else None)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, pos, cache=None):
        """x: (B, T, C); pos: (T,) absolute positions of the T tokens; cache: a KVCache or None."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        if self.rotary is not None:
            q, k = self.rotary(q, pos), self.rotary(k, pos)
        dropout = self.dropout if self.training else 0.0
        if cache is None:
            y = attend(q, k, v, dropout=dropout)  # (B, nh, T, hs)
        else:
            k, v = cache.append(k, v)  # (B, nh, S, hs): every token so far, positions 0 .. S-1
            y = attend(q, k, v, q_pos=pos, k_pos=torch.arange(cache.length, device=x.device))
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def new_cache(self, batch_size, max_len, device, dtype):
        return KVCache(batch_size, max_len, self.n_head, self.head_dim, device, dtype)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per weight, plus the PaLM attention
        term 12 * n_head * head_dim * T (QK^T and AV, forward and backward)."""
        return 6 * (self.c_attn.weight.numel() + self.c_proj.weight.numel()) \
            + 12 * self.n_head * self.head_dim * seq_len
