"""Causal self-attention (multi-head, grouped-query, multi-query), sliding-window (local) attention,
cross-layer KV sharing, their caches, and `attend()`: the one function that picks the kernel.

Vaswani et al., "Attention Is All You Need", arXiv 1706.03762.

    q, k, v = x W_q, x W_k, x W_v           q: n_head heads, k and v: n_kv_head heads, of head_dim hs
    y_h = softmax(q_h k_g^T / sqrt(hs) + M) v_g      g = h // (n_head / n_kv_head)
    y = concat_h(y_h) W_o
    M_ij = 0 if  j <= i  (and, in a local layer,  j > i - window)  else -inf

- MQA / GQA (Shazeer, "Fast Transformer Decoding: One Write-Head is All You Need", arXiv 1911.02150;
  Ainslie et al., "GQA", arXiv 2305.13245): `n_kv_head` key/value heads shared by groups of
  n_head / n_kv_head consecutive query heads: query head h reads KV head h // (n_head // n_kv_head).
  The KV cache shrinks by n_head / n_kv_head; n_kv_head = 1 is MQA, n_kv_head = n_head plain MHA.
- Local (sliding-window) attention (Beltagy et al., "Longformer", arXiv 2004.05150), interleaved with
  global layers as in Character.AI's inference notes and Gemma 2/3 (`layers="LLLLLG"`): a query
  attends to itself and the `window - 1` tokens before it, i.e. key j is visible to query i iff
  i - window < j <= i. In generation a local layer keeps only the last `window` keys and values
  (`RingKVCache`), so its memory does not grow with the context.
- Cross-layer KV sharing (Brandon et al., "Reducing Transformer Key-Value Cache Size with Cross-Layer
  Attention", arXiv 2405.12981; Character.AI): consecutive attention layers of one kind (global with
  global, local with local) form groups of `kv_share`; the group's first layer computes keys and
  values, the others only queries, and all of them read the first layer's keys/values (and cache).
  Grouping within a kind keeps every cache of one shape: a global layer never reads a ring buffer.

Kernels, in the order `attend()` tries them:
  global, training / prefill: `flash_attn` (when importable, fp16/bf16 on a GPU; not installable on
  our machines, so unverified here), else SDPA with is_causal=True (flash/cuDNN kernels on a GPU).
  local, training / prefill: `flash_attn` with window_size=(window-1, 0) (unverified here, as above);
  else on a GPU the kernel named by WINDOW_KERNEL (below); else (CPU) SDPA with an explicit mask.
  decoding against a cache, routed subsets of tokens (q_pos / k_pos given): SDPA with an explicit
  boolean mask built from the positions.
Optional QK-norm (`qk_norm`): each head's queries and keys are RMS-normalised before RoPE, which
bounds the attention logits (Dehghani et al., arXiv 2302.05442; modded-nanogpt, nanochat).
Config: n_head, n_kv_head, n_embd, bias, dropout, window, kv_share, qk_norm; the letters G and L in
`layers`.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpt.rope import Rotary

try:  # optional fast path: https://github.com/Dao-AILab/flash-attention
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


def _flex():
    """torch's FlexAttention module, imported on first use: it imports torch._dynamo, ~2 s that a
    run without the "flex" window kernel should not wait for at startup."""
    from torch.nn.attention import flex_attention
    return flex_attention


# The sliding-window kernel on a GPU when flash_attn is not importable, all exact:
#   "flash_split": queries in blocks of `window`; each block attends causally to itself and to the
#                  visible part of the previous block (a flipped causal problem) in two flash
#                  calls, merged by their log-sum-exps; `window` keys per query, ~1/4 of causal
#                  attention's work at 8192 / 1024. fp16/bf16 only (else "chunked").
#   "flex":        FlexAttention with a sliding-window block mask of FLEX_BLOCK_SIZE tiles and
#                  FLEX_KERNEL_OPTIONS (tile sizes, warps, stages) for the compiled kernel.
#   "chunked":     queries in blocks of `window`, each attending to its own and the previous block
#                  (2 * window keys) through SDPA with a mask; 2 SDPA calls; supports dropout.
#   "mask":        SDPA with the explicit (T, T) mask (the reference).
# flash_split and flex do no dropout; with dropout > 0 the chunked kernel runs instead.
# Default "flex": GPT-2-124M at 8192 with 5 local (1024) : 1 global layers trains at 41.73 ms a
# step with it against 48.09 with flash_split and 52.50 all global (H100, bench/RESULTS.md).
WINDOW_KERNEL = "flex"
FLEX_BLOCK_SIZE = 128
FLEX_KERNEL_OPTIONS = None  # e.g. {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2}

ATTENTION_LETTERS = ("G", "L")  # layer letters whose mixer is this file's attention
EMPTY = -(2 ** 62)  # the position of an empty ring-buffer slot: never visible


# ------------------------------------------------------------------------------------------------
# attend(): the kernel switch

def visible(q_pos, k_pos, window=None):
    """Boolean mask, True where a query at q_pos may read a key at k_pos: k <= q (and k > q - window).
    q_pos: (T,) or (B, T); k_pos: (S,) or (B, S). Returns (T, S) or (B, T, S)."""
    q, k = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    return mask


def sees_every_key(q_pos, k_pos, window=None):
    """True for the step that decoding repeats: one new token (q_pos: (1,)) against a global cache
    (KVCache: k_pos (S,), every token up to and including it), which needs no mask."""
    return window is None and q_pos.dim() == k_pos.dim() == 1 and q_pos.shape[0] == 1


def attend(q, k, v, q_pos=None, k_pos=None, dropout=0.0, window=None):
    """Causal attention of q over k, v, optionally limited to a sliding window.

    q: (B, nh, T, hs); k, v: (B, nkv, S, hs) with nh a multiple of nkv (query head h reads KV head
    h // (nh // nkv)). With q_pos=k_pos=None the T queries and S=T keys are the same positions in
    order (training, prefill from empty). Otherwise q_pos: (T,) or (B, T) and k_pos: (S,) or (B, S)
    are absolute positions and query i sees key j iff k_pos[j] <= q_pos[i] (and, with a window,
    k_pos[j] > q_pos[i] - window). Returns (B, nh, T, hs).
    """
    gqa = k.shape[1] != q.shape[1]
    if q_pos is None:
        T = q.shape[2]
        if window is not None and window < T:
            return local_attend(q, k, v, window, dropout)
        if _flash_attn_applies(q):
            return _flash_attn(q, k, v, dropout)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=gqa)
    if sees_every_key(q_pos, k_pos, window):  # no mask: SDPA may pick its flash (split-KV) kernel
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    mask = visible(q_pos, k_pos, window)  # (T, S) or (B, T, S)
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)  # (B, 1, T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)


def decoding_kernels():
    """A context for generation: SDPA picks among flash, memory-efficient and math, not cuDNN's
    attention. PyTorch 2.11 prefers cuDNN on the H100, which builds a new plan for every new shape
    (37 ms each there), and generation makes a new shape every token: 69 ms per token for GPT-2-124M
    against 6 ms without it (bench/RESULTS.md). Training keeps PyTorch's choice (fixed shapes)."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _flash_attn_applies(q):
    return flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)


def _flash_attn(q, k, v, dropout, window=None):
    """flash_attn's kernel (GQA native); window_size=(window-1, 0): itself and window-1 before."""
    y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout,
                        causal=True, window_size=(-1, -1) if window is None else (window - 1, 0))
    return y.transpose(1, 2)  # (B, nh, T, hs)


def local_attend(q, k, v, window, dropout=0.0, kernel=None):
    """Sliding-window causal attention, q/k/v as in attend() with q and k at the same positions.
    kernel: one of "flash_split", "flex", "chunked", "mask" (default: flash_attn's own window when
    importable, else WINDOW_KERNEL on a GPU, "mask" on a CPU)."""
    if kernel is None:
        if _flash_attn_applies(q):
            return _flash_attn(q, k, v, dropout, window)
        kernel = WINDOW_KERNEL if q.is_cuda else "mask"
    if dropout > 0 and kernel in ("flash_split", "flex"):
        kernel = "chunked"
    if kernel == "flash_split":
        return flash_split_window(q, k, v, window)
    if kernel == "flex":
        return flex_window(q, k, v, window)
    if kernel == "chunked":
        return chunked_window(q, k, v, window, dropout)
    if kernel == "mask":
        pos = torch.arange(q.shape[2], device=q.device)
        return attend(q, k, v, q_pos=pos, k_pos=pos, dropout=dropout, window=window)
    raise ValueError(f"unknown window kernel {kernel!r}: use flash_split, flex, chunked or mask")


def _expand_kv(q, k, v):
    """Repeat each KV head n_head / n_kv_head times, so head h of the result is KV head h // group."""
    g = q.shape[1] // k.shape[1]
    if g == 1:
        return k, v
    return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # (B, nh, S, hs)


def _pad_to(x, n):
    """Zero-pad the time axis (dim 2) of x to length n."""
    return x if x.shape[2] == n else F.pad(x, (0, 0, 0, n - x.shape[2]))


# ------------------------------------------------------------------------------------------------
# Sliding window, "chunked": two SDPA calls over blocks of `window` queries

def chunked_window(q, k, v, window, dropout=0.0):
    """Queries in blocks of c = window: block 0 is plain causal attention over itself; every later
    block b sees the 2c keys of blocks b-1 and b through one shared (c, 2c) mask, key j visible to
    query i iff i < j <= i + c. Padded keys at the end are in every real query's future."""
    B, nh, T, hs = q.shape
    c = window
    nb = -(-T // c)
    k, v = _expand_kv(q, k, v)
    q, k, v = (_pad_to(x, nb * c) for x in (q, k, v))
    first = F.scaled_dot_product_attention(q[:, :, :c], k[:, :, :c], v[:, :, :c], is_causal=True,
                                           dropout_p=dropout)  # (B, nh, c, hs)

    def blocks(x, lo, hi):  # blocks lo..hi-1 into the batch: (B * (hi - lo), nh, c, hs)
        return x.view(B, nh, nb, c, hs)[:, :, lo:hi].transpose(1, 2).reshape(-1, nh, c, hs)

    kb = torch.cat([blocks(k, 0, nb - 1), blocks(k, 1, nb)], dim=2)  # (B * (nb-1), nh, 2c, hs)
    vb = torch.cat([blocks(v, 0, nb - 1), blocks(v, 1, nb)], dim=2)
    i = torch.arange(c, device=q.device)[:, None]
    j = torch.arange(2 * c, device=q.device)[None]
    mask = (j > i) & (j <= i + c)  # (c, 2c)
    rest = F.scaled_dot_product_attention(blocks(q, 1, nb), kb, vb, attn_mask=mask, dropout_p=dropout)
    rest = rest.view(B, nb - 1, nh, c, hs).transpose(1, 2).reshape(B, nh, (nb - 1) * c, hs)
    return torch.cat([first, rest], dim=2)[:, :, :T]  # (B, nh, T, hs)


# ------------------------------------------------------------------------------------------------
# Sliding window, "flex": FlexAttention with a block mask built from block indices

_flex_compiled = None
_window_mods = {}


def _window_mod(window):
    """The mask_mod of a window (one function object per window, so compiled kernels are reused)."""
    if window not in _window_mods:
        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (kv_idx > q_idx - window)
        _window_mods[window] = mask_mod
    return _window_mods[window]


def window_block_mask(T, window, block_size, device):
    """The sliding-window BlockMask for T queries and keys, built from block indices (cheap, no
    (T, T) mask): key tile n is 'full' for query tile m when every pair in it is visible, 'partial'
    (mask_mod applied) when some are, skipped otherwise."""
    n = -(-T // block_size)
    lo = torch.arange(n, device=device) * block_size
    hi = lo + block_size - 1
    q_lo, q_hi, k_lo, k_hi = lo[:, None], hi[:, None], lo[None], hi[None]
    full = (k_hi <= q_lo) & (k_lo > q_hi - window)  # (n, n)
    partial = (k_lo <= q_hi) & (k_hi > q_lo - window) & ~full

    def pack(sel):  # per query tile: how many key tiles, and their indices (selected first)
        counts = sel.sum(-1).to(torch.int32)
        order = torch.argsort((~sel).to(torch.int32), dim=-1, stable=True).to(torch.int32)
        return counts[None, None], order[None, None]  # (1, 1, n), (1, 1, n, n)

    return _flex().BlockMask.from_kv_blocks(*pack(partial), *pack(full), BLOCK_SIZE=block_size,
                                            mask_mod=_window_mod(window), seq_lengths=(T, T))


def flex_window(q, k, v, window):
    """Sliding-window attention with FlexAttention (compiled when run eagerly on a GPU)."""
    global _flex_compiled
    block_mask = window_block_mask(q.shape[2], window, FLEX_BLOCK_SIZE, q.device)
    fn = _flex().flex_attention
    if q.is_cuda and not torch.compiler.is_compiling():
        if _flex_compiled is None:
            _flex_compiled = torch.compile(fn, dynamic=False)
        fn = _flex_compiled
    kwargs = {"kernel_options": FLEX_KERNEL_OPTIONS} if FLEX_KERNEL_OPTIONS else {}
    return fn(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1], **kwargs)


# ------------------------------------------------------------------------------------------------
# Sliding window, "flash_split": two causal flash calls per block of `window` queries, merged
#
# With blocks of c = window, query i of block b sees keys (b-1, j) for j > i and (b, j) for j <= i.
#   part 1: (b, i) over block b, causal: a square causal problem per block.
#   part 2: (b, i) over block b-1, j > i. Reverse both (i' = c-1-i, j' = c-1-j): j' < i'. Drop
#           i' = 0 (query c-1 sees nothing of b-1) and j' = c-1 (key 0 is seen by no query): what
#           remains, c-1 queries over c-1 keys, is again square causal.
# Each part returns its output o_p and log-sum-exp L_p; the merge is
#     L = log(e^L1 + e^L2),   o = o1 e^(L1 - L) + o2 e^(L2 - L).
# The backward runs each part's flash backward with the merged o and L: it recomputes
# P = exp(S - L) and D = rowsum(dO * o), which are exactly the merged softmax's, so each part yields
# its exact share of dq, dk, dv (as in ring attention).

def _lse_attn_fwd(q, k, v):
    """Causal attention with its log-sum-exp. q, k, v: (N, H, L, D) -> o (N, H, L, D), lse (N, H, L)
    fp32, aux: what the flash backward needs, (tensors, ints), or None. Flash on a GPU in fp16/bf16;
    a plain-PyTorch reference otherwise (it also serves the CPU tests of the split)."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        o, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, True)
        return o, lse, ((cq, ck, seed, offset), (mq, mk))
    s = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (N, H, L, L)
    causal = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~causal, float("-inf"))
    lse = s.logsumexp(-1)  # (N, H, L)
    o = (s - lse[..., None]).exp() @ v.float()
    return o.to(q.dtype), lse, None


def _lse_attn_bwd(do, q, k, v, o, lse, aux):
    """Gradients of causal attention given the (merged) output o and log-sum-exp lse."""
    if aux is not None:
        (cq, ck, seed, offset), (mq, mk) = aux
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, o, lse, cq, ck, mq, mk, 0.0, True, seed, offset)
    scale = 1 / math.sqrt(q.shape[-1])
    qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
    s = (qf @ kf.transpose(-2, -1)) * scale
    causal = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).tril()
    p = (s - lse[..., None]).exp().masked_fill(~causal, 0.0)  # (N, H, L, L)
    dv = p.transpose(-2, -1) @ dof
    dp = dof @ vf.transpose(-2, -1)
    ds = p * (dp - (dof * o.float()).sum(-1, keepdim=True))
    dq, dk = (ds @ kf) * scale, (ds.transpose(-2, -1) @ qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _heads(x):
    """(N, L, H, D) -> (N, H, L, D) with the head-interleaved memory layout flash kernels use."""
    return x.contiguous().transpose(1, 2)


class _FlashSplitWindow(torch.autograd.Function):
    """Sliding-window attention for T = nb * c, window c, equal head counts; see the comment above.
    Internally tensors are (B, nb, c, H, D): block, position in block, head."""

    @staticmethod
    def _parts(q5, k5, v5):
        """The two problems' inputs as (N, H, L, D): part 1 all blocks; part 2 reversed."""
        B, nb, c, H, D = q5.shape
        p1 = [_heads(x.reshape(B * nb, c, H, D)) for x in (q5, k5, v5)]
        q2 = q5[:, 1:, : c - 1].flip(2)  # queries i = c-2 .. 0 of blocks 1..nb-1
        k2, v2 = (x[:, :-1, 1:].flip(2) for x in (k5, v5))  # keys j = c-1 .. 1 of blocks 0..nb-2
        p2 = [_heads(x.reshape(B * (nb - 1), c - 1, H, D)) for x in (q2, k2, v2)]
        return p1, p2

    @staticmethod
    def forward(ctx, q, k, v, c):
        B, H, T, D = q.shape
        nb = T // c
        q5, k5, v5 = (x.transpose(1, 2).reshape(B, nb, c, H, D) for x in (q, k, v))
        p1, p2 = _FlashSplitWindow._parts(q5, k5, v5)
        o1, lse1, aux1 = _lse_attn_fwd(*p1)
        o2, lse2, aux2 = _lse_attn_fwd(*p2)
        o = o1.transpose(1, 2).float().reshape(B, nb, c, H, D)  # (B, nb, c, H, D)
        lse = lse1.reshape(B, nb, H, c).clone()  # (B, nb, H, c)
        o2 = o2.transpose(1, 2).float().reshape(B, nb - 1, c - 1, H, D).flip(2)  # rows i = 0..c-2
        lse2 = lse2.reshape(B, nb - 1, H, c - 1).flip(-1)
        l1 = lse[:, 1:, :, : c - 1]
        merged = torch.logaddexp(l1, lse2)  # (B, nb-1, H, c-1)
        w1 = (l1 - merged).exp().transpose(2, 3)[..., None]  # (B, nb-1, c-1, H, 1)
        w2 = (lse2 - merged).exp().transpose(2, 3)[..., None]
        o[:, 1:, : c - 1] = o[:, 1:, : c - 1] * w1 + o2 * w2
        lse[:, 1:, :, : c - 1] = merged
        o = o.to(q.dtype)
        flash = aux1 is not None
        ctx.save_for_backward(q, k, v, o, lse, *(aux1[0] + aux2[0] if flash else ()))
        ctx.sizes = (aux1[1], aux2[1]) if flash else None
        ctx.c = c
        return o.reshape(B, T, H, D).transpose(1, 2)  # (B, H, T, D)

    @staticmethod
    def backward(ctx, dy):
        q, k, v, o, lse, *flash = ctx.saved_tensors
        aux1 = aux2 = None
        if ctx.sizes is not None:
            aux1, aux2 = (tuple(flash[:4]), ctx.sizes[0]), (tuple(flash[4:]), ctx.sizes[1])
        c = ctx.c
        B, H, T, D = q.shape
        nb = T // c
        q5, k5, v5 = (x.transpose(1, 2).reshape(B, nb, c, H, D) for x in (q, k, v))
        do5 = dy.transpose(1, 2).reshape(B, nb, c, H, D)
        p1, p2 = _FlashSplitWindow._parts(q5, k5, v5)
        # part 1, with the merged output and log-sum-exp of every query
        do1, o1 = (_heads(x.reshape(B * nb, c, H, D)) for x in (do5, o))
        dq1, dk1, dv1 = _lse_attn_bwd(do1, *p1, o1, lse.reshape(B * nb, H, c), aux1)
        dq, dk, dv = (x.transpose(1, 2).reshape(B, nb, c, H, D).float() for x in (dq1, dk1, dv1))
        # part 2: the same rows, reversed as in the forward
        do2, o2 = (_heads(x[:, 1:, : c - 1].flip(2).reshape(B * (nb - 1), c - 1, H, D)) for x in (do5, o))
        lse2 = lse[:, 1:, :, : c - 1].flip(-1).reshape(B * (nb - 1), H, c - 1).contiguous()
        dq2, dk2, dv2 = _lse_attn_bwd(do2, *p2, o2, lse2, aux2)
        unflip = lambda x: x.transpose(1, 2).reshape(B, nb - 1, c - 1, H, D).flip(2).float()  # noqa: E731
        dq[:, 1:, : c - 1] += unflip(dq2)
        dk[:, :-1, 1:] += unflip(dk2)
        dv[:, :-1, 1:] += unflip(dv2)
        back = lambda x, like: x.to(like.dtype).reshape(B, T, H, D).transpose(1, 2)  # noqa: E731
        return back(dq, q), back(dk, k), back(dv, v), None


def flash_split_window(q, k, v, window):
    """Sliding-window attention from two causal flash calls per block of `window` queries (see
    above). Falls back to chunked_window where flash cannot run (fp32, head_dim > 256 or not a
    multiple of 8) unless the inputs are on the CPU, where the reference primitives run (tests)."""
    B, nh, T, hs = q.shape
    if q.is_cuda and (q.dtype not in (torch.float16, torch.bfloat16) or hs > 256 or hs % 8):
        return chunked_window(q, k, v, window)
    c = window
    nb = -(-T // c)
    k, v = _expand_kv(q, k, v)
    q, k, v = (_pad_to(x, nb * c) for x in (q, k, v))
    return _FlashSplitWindow.apply(q, k, v, c)[:, :, :T]  # (B, nh, T, hs)


# ------------------------------------------------------------------------------------------------
# Caches

class KVCache:
    """Keys and values of the tokens seen so far, preallocated to max_len: (B, nkv, max_len, hs).
    Tokens are stored at positions 0, 1, ... in order (generate.py restarts at 0 when it slides)."""

    def __init__(self, batch_size, max_len, n_kv_head, head_dim, device, dtype):
        shape = (batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0
        self.last = None  # what the latest update returned: read by the other layers of a KV-sharing group

    def update(self, k, v, pos):
        """Store k, v: (B, nkv, T, hs) of the tokens at pos: (T,). Returns the keys, values and key
        positions to attend to: (B, nkv, S, hs) twice and (S,), or None for the positions when the
        keys are exactly the new tokens (prefill from empty: the fast causal kernels apply)."""
        T = k.shape[2]
        if self.length + T > self.k.shape[2]:
            raise ValueError(f"KV cache full: {self.length} + {T} tokens > max_len {self.k.shape[2]}")
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        if self.length == 0:
            self.last = (k, v, None)
        else:
            k_pos = torch.arange(self.length + T, device=k.device)
            self.last = (self.k[:, :, :self.length + T], self.v[:, :, :self.length + T], k_pos)
        self.length += T
        return self.last

    def nbytes(self):
        return self.k.nbytes + self.v.nbytes


class RingKVCache:
    """The last `window` keys and values of a local layer, in a ring: position p lives in slot
    p % window. (B, nkv, window, hs) for k and v, and each slot's position (EMPTY when unused)."""

    def __init__(self, batch_size, window, n_kv_head, head_dim, device, dtype):
        shape = (batch_size, n_kv_head, window, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = torch.full((window,), EMPTY, device=device, dtype=torch.long)
        self.window = window
        self.seen = 0
        self.last = None

    def update(self, k, v, pos):
        """As KVCache.update. One new token is written first, then the ring is read: the slot it
        overwrites held position p - window, which it may not see anyway. Several new tokens are
        read together with the ring, since their early queries need keys the writes overwrite."""
        T = k.shape[2]
        if self.seen == 0:
            result = (k, v, None)
        elif T > 1:
            result = (torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2), torch.cat([self.pos, pos]))
        n = min(T, self.window)
        slots = pos[-n:] % self.window  # (n,)
        self.k[:, :, slots] = k[:, :, -n:]
        self.v[:, :, slots] = v[:, :, -n:]
        self.pos[slots] = pos[-n:]
        if self.seen > 0 and T == 1:
            result = (self.k, self.v, self.pos)
        self.seen += T
        self.last = result
        return result

    def entries(self):
        """How many keys the ring holds (at most window)."""
        return int((self.pos != EMPTY).sum())

    def nbytes(self):
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes


class SharedKV:
    """Hands one forward's keys/values from a KV-sharing group's first layer to the others, when no
    cache is in use (training): the same update()/last protocol as the caches, storing nothing."""

    last = None

    def update(self, k, v, pos):
        self.last = (k, v, None)
        return self.last


def kv_owners(config):
    """For each layer, the index of the layer whose keys/values (and cache) it uses: itself, or the
    first layer of its KV-sharing group. Groups are `kv_share` consecutive attention layers of one
    letter (G with G, L with L); layers of other letters keep their own state."""
    owners, count, first = [], {}, {}
    for i, letter in enumerate(config.layer_kinds()):
        if letter not in ATTENTION_LETTERS:
            owners.append(i)
            continue
        n = count.get(letter, 0)
        count[letter] = n + 1
        if n % config.kv_share == 0:
            first[letter] = i
        owners.append(first[letter])
    return owners


def link_caches(owners, make):
    """Per-layer list where layer i gets make(i) if it owns its state, else its owner's object."""
    out = []
    for i, owner in enumerate(owners):
        out.append(make(i) if owner == i else out[owner])
    return out


def shared_kv_slots(config):
    """What GPT.forward passes to each layer when there is no cache: None, or, in a KV-sharing
    group, one SharedKV object for all its layers (a fresh one per forward)."""
    owners = kv_owners(config)
    if config.kv_share == 1:
        return [None] * len(owners)
    shared = {o for i, o in enumerate(owners) if o != i}
    return link_caches(owners, lambda i: SharedKV() if i in shared else None)


# ------------------------------------------------------------------------------------------------
# The layer

class CausalSelfAttention(nn.Module):
    """Global (window=None) or local attention with n_head query heads and n_kv_head KV heads.
    With reads_kv=True the layer has no K/V projection: it reads keys and values that the first
    layer of its KV-sharing group left in the shared cache / SharedKV object."""

    def __init__(self, config, window=None, reads_kv=False):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.window, self.reads_kv = window, reads_kv
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        out = q_dim if reads_kv else q_dim + 2 * kv_dim  # q | k | v
        self.c_attn = nn.Linear(config.n_embd, out, bias=config.bias)
        self.c_proj = nn.Linear(q_dim, config.n_embd, bias=config.bias)
        self.c_proj.residual = True  # scaled init (model.py)
        self.rotary = (Rotary(config.rotary_dims, config.rope_base, config.block_size)
                       if config.pos == "rope" else None)
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def _position(self, x, pos):
        """QK-norm (when on: each head's query/key RMS-normalised, no gain, as in modded-nanogpt
        and nanochat), then RoPE (when on). x: (B, heads, T, hs)."""
        if self.qk_norm:
            x = F.rms_norm(x, (x.shape[-1],))
        return x if self.rotary is None else self.rotary(x, pos)

    def forward(self, x, pos, cache=None):
        """x: (B, T, C); pos: (T,) absolute positions of the T tokens; cache: a KVCache, RingKVCache,
        SharedKV or None."""
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        qkv = self.c_attn(x)  # (B, T, (nh + 2 nkv) hs), or (B, T, nh hs) when reading shared KV
        q = self._position(qkv[..., : nh * hs].view(B, T, nh, hs).transpose(1, 2), pos)  # (B, nh, T, hs)
        if self.reads_kv:
            k, v, k_pos = cache.last  # the group's first layer ran just before, on the same tokens
        else:
            k, v = qkv[..., nh * hs:].split(nkv * hs, dim=2)
            k = self._position(k.view(B, T, nkv, hs).transpose(1, 2), pos)  # (B, nkv, T, hs)
            v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
            k_pos = None
            if cache is not None:
                k, v, k_pos = cache.update(k, v, pos)  # (B, nkv, S, hs), (S,) or None
            elif self.window is not None and pos.dim() == 2:
                k_pos = pos  # a routed subset of tokens (MoD): the window counts positions, not indices
        if k_pos is None:
            y = attend(q, k, v, dropout=self.dropout if self.training else 0.0, window=self.window)
        else:
            y = attend(q, k, v, q_pos=pos, k_pos=k_pos, window=self.window)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, nh hs)
        return self.resid_dropout(self.c_proj(y))

    def new_cache(self, batch_size, max_len, device, dtype):
        if self.window is not None:
            return RingKVCache(batch_size, min(self.window, max_len), self.n_kv_head, self.head_dim,
                               device, dtype)
        return KVCache(batch_size, max_len, self.n_kv_head, self.head_dim, device, dtype)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per weight (a reader of shared KV has no
        K/V weights, GQA fewer), plus the PaLM attention term 12 * n_head * head_dim * T (QK^T and
        AV, forward and backward) with T = min(window, seq_len) in a local layer."""
        span = seq_len if self.window is None else min(self.window, seq_len)
        return 6 * (self.c_attn.weight.numel() + self.c_proj.weight.numel()) \
            + 12 * self.n_head * self.head_dim * span
