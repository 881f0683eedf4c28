"""Multi-head latent attention (MLA): every head's keys and values are read out of one small latent
vector per token, so the decoding cache holds that latent, plus one rotary key shared by all heads,
instead of n_head keys and values.

DeepSeek-AI, "DeepSeek-V2: A Strong, Economical, and Efficient Mixture-of-Experts Language Model",
arXiv 2405.04434 (section 2.1), and "DeepSeek-V3 Technical Report", arXiv 2412.19437 (section 2.1.1).
Per token x (C,), heads h = 1 .. nh, with r = kv_lora_rank, dn = qk_nope_head_dim,
dr = qk_rope_head_dim, dv = v_head_dim:

    c_q  = RMSNorm(x W_dq)                      (q_lora_rank,)    bottleneck (c_q = x if q_lora_rank = 0)
    [q_h, q_h^R] = c_q W_uq,h                   (dn,), (dr,)      then q_h^R <- RoPE(q_h^R, pos)
    c_kv = RMSNorm(x W_dkv)                     (r,)              the latent: cached
    k^R  = RoPE(x W_kr, pos)                    (dr,)             one rotary key for all heads: cached
    k_h  = c_kv W_uk,h      v_h = c_kv W_uv,h   (dn,), (dv,)      W_uk,h: (r, dn), W_uv,h: (r, dv)
    s_h(i, j) = (q_h(i)·k_h(j) + q_h^R(i)·k^R(j)) / sqrt(dn + dr)
    y = concat_h( softmax_j(s_h) v_h ) W_o

The rotary part is "decoupled" because RoPE's position-dependent rotation, sitting between q_h and
W_uk,h, would stop W_uk,h from being moved onto the query side; so positions travel in a separate
small key k^R that is cached as is, and the latent stays position-free.

Two ways to run it, picked automatically in `forward`:
  - expanded (training, and prefill into an empty cache): k_h, v_h are formed for every key token
    and `attend()` (attention.py) runs the flash path. Its kernels want one head size for q, k and v
    (dn + dr vs dv): on a GPU the smaller side is zero-padded and the scale kept, see `_attend_padded`.
  - absorbed (decoding: whenever the cache already holds tokens). Matrix products regroup:
        q_h·k_h(j) = q_h·(c_kv(j) W_uk,h) = (q_h W_uk,h^T)·c_kv(j)        W_uk absorbed into the query
        Σ_j p_hj v_h(j) = (Σ_j p_hj c_kv(j)) W_uv,h                       W_uv absorbed into the output
    so each head's query is mapped into latent space once, scores are taken directly against the
    cached latents, and W_uv,h (then W_o) is applied to the weighted sum of latents. No per-head
    key or value is ever formed or cached. All heads read the same latents: this is multi-query
    attention with one wide KV head (FlashMLA's formulation, DeepSeek's decoding kernel,
    https://github.com/deepseek-ai/FlashMLA), and it runs as two batched matrix products:
        query rows  q'_h = [q_h W_uk,h^T ; q_h^R]     (r + dr,)   the nh heads folded into the rows
        key         k'   = [c_kv ; k^R]                (r + dr,)   one head: the cached row itself
        value       v'   = c_kv                        (r,)        one head: the row's first r numbers
        o_h = softmax_j(q'_h·k'(j) / sqrt(dn + dr)) v'    (r,),    then y = concat_h(o_h W_uv,h) W_o
    Why not SDPA: its flash kernels take q, k, v of one head size <= 256 (here 288, 288, 256), and
    its memory-efficient kernel, which does take them, runs one thread block per sequence for
    nh query rows: 429 us per layer at batch 32 x 8192 on an H100 against 164 us for the two
    matrix products. Whole-model decoding there is bound by the host launching kernels unless it is
    compiled (generate(compile=True), sampling.py --compile): compiled, this step decodes 6,669
    tok/s against 5,452 with one SDPA call and 5,422 for MHA with its full cache (bench/RESULTS.md).
    The up-projections are applied as per-head products rather than pre-multiplied into W_uq and
    W_o: at these sizes the merged matrices would be larger.
The cache (`LatentCache`) holds one row [c_kv ; k^R] per token, c_kv already normalised and k^R
already rotated: kv_lora_rank + qk_rope_head_dim numbers per token per layer, against 2 * n_embd
for MHA. The row is the absorbed attention's key and its first r numbers the value, so decoding
reads the cache as it lies, without copying or concatenating anything.
Local layers and cross-layer KV sharing work as in attention.py: an L layer attends within its
window and caches a ring of latents (`LatentRingCache`); with kv_share > 1 the later layers of a
group have no W_dkv, W_kr and read the first layer's latents through their own W_uk, W_uv.
Config: attn="mla", q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim
(0 = derived from head_dim, see GPTConfig.mla_dims), rope_base; window, kv_share; G and L layers.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt.attention import KVCache, RingKVCache, attend, sees_every_key, visible
from gpt.rope import Rotary


# ------------------------------------------------------------------------------------------------
# Caches: attention.py's, with the slots resized. Per token the key slot "k" holds the row
# [c_kv ; k^R] (B, 1, S, r + dr): the normalised latent, then the rotated shared key. The value
# slot "v" is empty (B, 1, S, 0): the values are the latents, read as a view of the rows. The
# update() protocol, the ring buffer of local layers, the hand-over to KV-sharing layers (`last`)
# and MoD's RoutedCache (shaped after these slots) are theirs.

class LatentCache(KVCache):
    """MLA's cache of a global layer: the row [c_kv ; k^R] of every token so far, r + dr numbers."""

    def __init__(self, batch_size, max_len, kv_lora_rank, rope_dim, device, dtype):
        super().__init__(batch_size, max_len, 1, kv_lora_rank + rope_dim, device, dtype)
        self.v = self.v.new_zeros(batch_size, 1, max_len, 0)


class LatentRingCache(RingKVCache):
    """MLA's cache of a local layer: the rows [c_kv ; k^R] of the last `window` tokens, in a ring."""

    def __init__(self, batch_size, window, kv_lora_rank, rope_dim, device, dtype):
        super().__init__(batch_size, window, 1, kv_lora_rank + rope_dim, device, dtype)
        self.v = self.v.new_zeros(batch_size, 1, window, 0)


class MultiHeadLatentAttention(nn.Module):
    """MLA, global (window=None) or local. With reads_kv=True (a later layer of a KV-sharing group)
    the layer has no latent projection: it reads the c_kv and k^R that the group's first layer
    left in the shared cache / SharedKV object, through its own W_uk and W_uv."""

    def __init__(self, config, window=None, reads_kv=False):
        super().__init__()
        d = config.mla_dims()
        self.n_head, self.window, self.reads_kv = config.n_head, window, reads_kv
        self.q_lora_rank, self.kv_lora_rank = d["q_lora_rank"], d["kv_lora_rank"]
        self.nope_dim, self.rope_dim = d["qk_nope_head_dim"], d["qk_rope_head_dim"]
        self.v_dim = d["v_head_dim"]
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = 1.0 / math.sqrt(self.qk_dim)
        C, nh, bias = config.n_embd, config.n_head, config.bias
        if self.q_lora_rank:
            self.wq_a = nn.Linear(C, self.q_lora_rank, bias=bias)  # W_dq
            self.q_norm = nn.RMSNorm(self.q_lora_rank, eps=1e-6)
            self.wq_b = nn.Linear(self.q_lora_rank, nh * self.qk_dim, bias=bias)  # W_uq
        else:
            self.wq = nn.Linear(C, nh * self.qk_dim, bias=bias)  # plain query projection
        if not reads_kv:
            self.wkv_a = nn.Linear(C, self.kv_lora_rank + self.rope_dim, bias=bias)  # W_dkv and W_kr
            self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=1e-6)
        # W_uk and W_uv of all heads. No bias: one on keys adds a constant to each query's scores
        # (softmax ignores it), one on values adds a constant that c_proj's bias already covers.
        self.wkv_b = nn.Linear(self.kv_lora_rank, nh * (self.nope_dim + self.v_dim), bias=False)
        self.c_proj = nn.Linear(nh * self.v_dim, C, bias=bias)  # W_o
        self.c_proj.residual = True  # scaled init (model.py)
        self.rotary = Rotary(self.rope_dim, config.rope_base, config.block_size)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.absorb = None  # None: automatic (see forward); True / False force a path (tests, notebook)

    # --------------------------------------------------------------------------------------------
    def queries(self, x, pos):
        """x: (B, T, C) -> q: (B, nh, T, dn), q_rope: (B, nh, T, dr), rotated to positions pos."""
        B, T, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)  # (B, T, nh*dqk)
        q = q.view(B, T, self.n_head, self.qk_dim).transpose(1, 2)  # (B, nh, T, dqk)
        q, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q, self.rotary(q_rope, pos)

    def latent(self, x, pos):
        """x: (B, T, C) -> what the cache holds, one row a token: [c_kv ; k^R] (B, 1, T, r + dr),
        c_kv normalised, k^R rotated; one "head", shared by all heads."""
        c_kv, k_rope = self.wkv_a(x).unsqueeze(1).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return torch.cat([self.kv_norm(c_kv), self.rotary(k_rope, pos)], dim=-1)

    def up_weights(self):
        """W_uk: (nh, dn, r) and W_uv: (nh, dv, r), views of wkv_b's weight (Linear's out x in layout)."""
        w = self.wkv_b.weight.view(self.n_head, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, :self.nope_dim], w[:, self.nope_dim:]

    # --------------------------------------------------------------------------------------------
    def forward(self, x, pos, cache=None):
        """x: (B, T, C); pos: (T,) absolute positions, or (B, T) for the tokens a MoD block routed;
        cache: a LatentCache, LatentRingCache, SharedKV, RoutedCache or RoutedPositions (mod.py), or None.

        Without a cache, or into an empty one (prefill), the expanded path runs (the flash kernels);
        against a cache that already holds tokens (decoding), the absorbed one. `self.absorb`
        overrides the choice.
        """
        B, T, C = x.shape
        q, q_rope = self.queries(x, pos)  # (B, nh, T, dn), (B, nh, T, dr)
        if self.reads_kv:
            kv, _, k_pos = cache.last  # the group's first layer ran just before, on the same tokens
        else:
            kv = self.latent(x, pos)  # (B, 1, T, r + dr)
            k_pos = None  # None: the keys are exactly these T tokens (causal from the start)
            if cache is not None:  # nothing for the value slot: the values are the rows' c_kv
                kv, _, k_pos = cache.update(kv, kv[..., :0], pos)  # (B, 1, S, r + dr), (S,)
        absorb = self.absorb if self.absorb is not None else k_pos is not None
        dropout = self.dropout if self.training else 0.0
        if absorb:
            y = self.absorbed(q, q_rope, kv, pos, pos if k_pos is None else k_pos, dropout)
        else:
            y = self.expanded(q, q_rope, kv, None if k_pos is None else pos, k_pos, dropout)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.v_dim)  # (B, T, nh*dv)
        return self.resid_dropout(self.c_proj(y))

    def expanded(self, q, q_rope, kv, q_pos, k_pos, dropout=0.0):
        """Per-head keys and values from the latents, then attend(). q: (B, nh, T, dn), q_rope:
        (B, nh, T, dr), kv: (B, 1, S, r + dr) the rows [c_kv ; k^R]; q_pos, k_pos: (T,), (S,), or per
        row (B, T), (B, S), or both None (keys = queries). Returns (B, nh, T, dv)."""
        B, _, S, _ = kv.shape
        c_kv, k_rope = kv.squeeze(1).split([self.kv_lora_rank, self.rope_dim], -1)  # (B, S, r), (B, S, dr)
        kv_h = self.wkv_b(c_kv).view(B, S, self.n_head, self.nope_dim + self.v_dim).transpose(1, 2)
        k, v = kv_h.split([self.nope_dim, self.v_dim], dim=-1)  # (B, nh, S, dn), (B, nh, S, dv)
        q = torch.cat([q, q_rope], dim=-1)  # (B, nh, T, dqk)
        k = torch.cat([k, k_rope.unsqueeze(1).expand(-1, self.n_head, -1, -1)], dim=-1)  # (B, nh, S, dqk)
        return _attend_padded(q, k, v, q_pos, k_pos, dropout, self.window)  # scale 1/sqrt(dqk)

    def absorbed(self, q, q_rope, kv, q_pos, k_pos, dropout=0.0):
        """Attention directly against the rows [c_kv ; k^R], as multi-query attention with the heads
        folded into the query rows; arguments as in expanded(), but q_pos and k_pos always given.
        Returns (B, nh, T, dv).

            q'_h = [q_h W_uk,h^T ; q_h^R]                     (r + dr,)
            o_h  = softmax_j(q'_h·[c_kv ; k^R](j) / sqrt(dn + dr)) c_kv    (r,), then o_h W_uv,h

        One new token against a global layer's cache (positions 0 .. S-1, the new token last: KVCache)
        sees every key, so the step that decoding repeats runs without a mask; windows, ring buffers
        and MoD's per-row positions apply one built from the positions."""
        B, nh, T, _ = q.shape
        r = self.kv_lora_rank
        w_uk, w_uv = self.up_weights()  # (nh, dn, r), (nh, dv, r)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q, w_uk)  # (B, nh, T, r): W_uk absorbed into the query
        q = torch.cat([q_lat, q_rope], dim=-1) * self.scale  # (B, nh, T, r + dr)
        rows = kv.squeeze(1)  # (B, S, r + dr): the cache itself, read in place
        scores = q.view(B, nh * T, -1) @ rows.transpose(1, 2)  # (B, nh*T, S)
        if not sees_every_key(q_pos, k_pos, self.window):
            mask = visible(q_pos, k_pos, self.window).tile(nh, 1)  # (nh*T, S), or (B, nh*T, S) routed
            scores = scores.masked_fill(~mask, float("-inf"))
        p = scores.softmax(-1, dtype=torch.promote_types(scores.dtype, torch.float32)).type_as(rows)  # (B, nh*T, S)
        p = F.dropout(p, dropout) if dropout > 0 else p
        o_lat = p @ rows[..., :r]  # (B, nh*T, r): each head's weighted sum of latents (a view: no copy)
        return torch.einsum("bhtr,hvr->bhtv", o_lat.view(B, nh, T, r), w_uv)  # (B, nh, T, dv): W_uv absorbed

    # --------------------------------------------------------------------------------------------
    def new_cache(self, batch_size, max_len, device, dtype):
        if self.window is not None:
            return LatentRingCache(batch_size, min(self.window, max_len), self.kv_lora_rank, self.rope_dim,
                                   device, dtype)
        return LatentCache(batch_size, max_len, self.kv_lora_rank, self.rope_dim, device, dtype)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per weight of every projection, plus the
        attention term 6 * n_head * (dqk + dv) * T (QK^T with dqk = dn + dr, AV with dv; PaLM's
        12 * n_head * head_dim * T when dqk = dv = head_dim), T = min(window, seq_len) when local."""
        span = seq_len if self.window is None else min(self.window, seq_len)
        weights = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * weights + 6 * self.n_head * (self.qk_dim + self.v_dim) * span


def _attend_padded(q, k, v, q_pos, k_pos, dropout, window=None, pad=None):
    """attend() with q, k: (B, nh, T|S, dqk) and v: (B, nh, S, dv). The flash kernels need
    dqk == dv, so on a GPU (pad=None: when q is on one) the smaller side is zero-padded to the larger,
    and where q, k grow q is multiplied by sqrt(d / dqk), so that SDPA's 1/sqrt(d) is still
    1/sqrt(dqk). Zero dims add nothing to q·k; padded value dims come out zero and are cut off.
    On a CPU the kernels take unequal sizes as they are."""
    dqk, dv = q.shape[-1], v.shape[-1]
    if dqk == dv or not (q.is_cuda if pad is None else pad):
        return attend(q, k, v, q_pos, k_pos, dropout, window)
    d = max(dqk, dv)
    if dqk < d:
        q = F.pad(q * math.sqrt(d / dqk), (0, d - dqk))
        k = F.pad(k, (0, d - dqk))
    v = F.pad(v, (0, d - dv))
    return attend(q, k, v, q_pos, k_pos, dropout, window)[..., :dv]
