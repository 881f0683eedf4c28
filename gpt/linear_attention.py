"""Linear attention with a learned (Hedgehog) feature map, the LoLCATs hybrid of a softmax sliding
window and linear attention, and the two stages that turn a trained softmax model into one.

Softmax attention weighs key j by exp(q_i·k_j), so a decoder must keep every key and value it has
seen; linear attention weighs it by a dot product of feature maps, φ(q_i)·φ(k_j), so the sum over
keys folds into a state of fixed size. Hedgehog learns φ so that linear attention mimics softmax
attention; LoLCATs keeps exact softmax over the last few tokens and linear attention before them,
and linearizes a trained model cheaply: first train only the feature maps, then a low-rank fine-tune.

Zhang et al., "The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax Mimicry",
arXiv 2402.04347. Zhang et al., "LoLCATs: On Low-Rank Linearizing of Large Language Models",
arXiv 2410.10254. The kernel trick and the causal recurrence: Katharopoulos et al., "Transformers are
RNNs", arXiv 2006.16236.

    φ(x) = [softmax(x W + b), softmax(-(x W + b))]      per head, over the f features: 2f in all;
                                                       W (hs x f) starts as the identity, b at 0
    linear:  y_i = Σ_{j<=i} φ(q_i)·φ(k_j) v_j / Σ_{j<=i} φ(q_i)·φ(k_j) = φ(q_i) S_i / φ(q_i)·z_i
             S_i = Σ_{j<=i} φ(k_j) v_j^T  (2f x hs),   z_i = Σ_{j<=i} φ(k_j)  (2f): the state
    hybrid, window w (LoLCATs), one normaliser over both parts:
             a_ij = γ exp(q_i·k_j / sqrt(hs) - m_i)   i - w < j <= i   (m_i: the max over these j)
             a_ij = φ(q_i)·φ(k_j)                     j <= i - w
             y_i  = Σ_j a_ij v_j / Σ_j a_ij           γ = sigmoid(one learnt logit per head), 0.1 at first

With w >= the sequence every key is in the window, the linear part is empty, γ cancels, and the layer
is exactly softmax attention. With w = 0 it is Hedgehog's pure linear attention.

Forms (all in fp32 inside, autocast off):
  `hybrid_attention`   the reference: (T, S) weight matrices, keys located by position, plus the state
                       of keys already folded away. The tests' oracle, and the decoding path.
  `hedgehog_attend`    the parallel form for training and prefill: the window part in blocks of w
                       queries, each reading its own and the previous block (w x 2w scores), and the
                       linear part in chunks of LINEAR_CHUNK: the masked products within a chunk, the
                       state of the chunks before across them. No data-dependent control flow, so
                       torch.compile traces it whole. On a GPU the linear part runs through the Triton
                       kernel `chunk_linear_attn` of fla-core (flash-linear-attention) when it imports
                       and, on a first small call, matches the PyTorch chunks (fla-core 0.6.0 refuses
                       its gated kernels on Hopper with Triton < 3.7.1; it is not installed on our
                       machines, so that branch is unverified here).
  recurrent            `LinearAttentionCache`: S and z (fp32) of the tokens that left the window, and
                       the window's keys and values in a ring (attention.RingKVCache). Its size does not
                       depend on the context: per token O(w + 2f) work per head and channel.

Linearizing a trained model (LoLCATs; `linearize.py` runs it on a train.py checkpoint):
  0. `linearized(teacher)`: the same GPT with each G or L layer an H layer holding the softmax
     layer's q, k, v and output weights; new are the feature maps and γ.
  1. attention transfer: the teacher is frozen; `transfer_loss` feeds each H layer the teacher's own
     input to that layer and takes the MSE to the softmax layer's output; only the feature maps and γ
     (`transfer_parameters`) train (LoLCATs: AdamW, lr 1e-2).
  2. a LoRA fine-tune (gpt/lora.py; LoLCATs: rank 8, alpha 16 on the q, k, v, o projections) on the
     next-token loss, merged back, so the result is a plain checkpoint with layers "H".

Config: linear_window (w; 0 = linear attention only), linear_features (f; 0 = head_dim); the letter
H in `layers`.
"""

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from gpt.attention import (ATTENTION_LETTERS, EMPTY, CausalSelfAttention, RingKVCache, _expand_kv,
                           _pad_to, visible)

try:  # optional fast path: https://github.com/fla-org/flash-linear-attention (pip install fla-core)
    from fla.ops.linear_attn import chunk_linear_attn
except ImportError:
    chunk_linear_attn = None

LINEAR_CHUNK = 64  # tokens per chunk of the PyTorch linear part (speed only: any size gives the same)
WINDOW_FACTOR_INIT = math.log(0.1 / 0.9)  # the logit of γ = 0.1: LoLCATs' init_window_factor


# ------------------------------------------------------------------------------------------------
# The feature map

class HedgehogFeatureMap(nn.Module):
    """φ(x) = [softmax(x W + b), softmax(-(x W + b))] over the features, one (W, b) per head.
    x: (B, nh, T, hs) -> (B, nh, T, 2 features). W starts as the identity (hs x features), b at 0."""

    def __init__(self, n_head, head_dim, features):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(head_dim, features).repeat(n_head, 1, 1))  # (nh, hs, f)
        self.bias = nn.Parameter(torch.zeros(n_head, 1, features))  # (nh, 1, f)

    def forward(self, x):
        u = torch.einsum("bhtd,hdf->bhtf", x, self.weight) + self.bias  # (B, nh, T, f)
        return torch.cat([u.softmax(-1), (-u).softmax(-1)], dim=-1)  # (B, nh, T, 2f)


# ------------------------------------------------------------------------------------------------
# The reference: weight matrices, keys located by position

def _wide(x):
    """x in fp32, or as it is when it is fp64 (the tests' oracle runs in fp64)."""
    return x if x.dtype == torch.float64 else x.float()


def hybrid_attention(q, k, v, fq, fk, window, gamma=None, q_pos=None, k_pos=None, state=None):
    """Hybrid (window > 0) or linear (window = 0) attention as (T, S) weight matrices.

    q: (B, nh, T, hs), fq = φ(q): (B, nh, T, F); k, v: (B, nh, S, hs), fk: (B, nh, S, F), with the
    same heads. The query at q_pos[i] reads the key at k_pos[j] through softmax if
    q - window < k <= q, through φ if k <= q - window (positions default to 0, 1, ...; EMPTY slots of a
    ring are read by no one), plus the keys already folded into state = (S (B, nh, F, hs),
    z (B, nh, F)). gamma: (nh,) the window's weight. Returns (B, nh, T, hs) in v's dtype.
    """
    dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, fq, fk = (_wide(x) for x in (q, k, v, fq, fk))
        q_pos = torch.arange(q.shape[2], device=q.device) if q_pos is None else q_pos
        k_pos = torch.arange(k.shape[2], device=q.device) if k_pos is None else k_pos
        linear = (k_pos[None] <= q_pos[:, None] - window) & (k_pos != EMPTY)  # (T, S)
        a = (fq @ fk.transpose(-2, -1)) * linear  # (B, nh, T, S)
        if window:
            s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, nh, T, S)
            s = s.masked_fill(~visible(q_pos, k_pos, window), float("-inf"))
            a = a + _wide(gamma)[:, None, None] * (s - s.amax(-1, keepdim=True)).exp()
        num, den = a @ v, a.sum(-1)  # (B, nh, T, hs), (B, nh, T)
        if state is not None:
            num = num + fq @ state[0]
            den = den + (fq * state[1][:, :, None]).sum(-1)
        return (num / den[..., None]).to(dtype)


# ------------------------------------------------------------------------------------------------
# The parallel form: the window part in blocks, the linear part in chunks

def window_part(q, k, v, window):
    """The softmax terms of the hybrid for queries and keys at positions 0 .. T-1, unnormalised:
    num_i = Σ_j exp(s_ij - m_i) v_j and den_i = Σ_j exp(s_ij - m_i) over i - window < j <= i.
    q, k, v: (B, nh, T, hs). Queries go in blocks of c = window; block b reads blocks b-1 and b (2c
    keys), key j of [previous | own] visible to query i iff i < j <= i + c (attention.chunked_window's
    mask). Returns num (B, nh, T, hs), den (B, nh, T), fp32."""
    B, nh, T, hs = q.shape
    c = window
    nb = -(-T // c)
    q, k, v = (_pad_to(_wide(x), nb * c).view(B, nh, nb, c, hs) for x in (q, k, v))  # (B, nh, nb, c, hs)
    previous = lambda x: F.pad(x, (0, 0, 0, 0, 1, 0))[:, :, :-1]  # noqa: E731  block b-1 at b; zeros at 0
    kb, vb = torch.cat([previous(k), k], dim=3), torch.cat([previous(v), v], dim=3)  # (B, nh, nb, 2c, hs)
    i = torch.arange(c, device=q.device)[:, None]
    j = torch.arange(2 * c, device=q.device)[None]
    b = torch.arange(nb, device=q.device)[:, None, None]
    mask = (j > i) & (j <= i + c) & ((b > 0) | (j >= c))  # (nb, c, 2c): block 0 has no previous block
    s = (q @ kb.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, nb, c, 2c)
    s = s.masked_fill(~mask, float("-inf"))
    p = (s - s.amax(-1, keepdim=True)).exp()  # every query sees itself: the max is finite
    num = (p @ vb).view(B, nh, nb * c, hs)[:, :, :T]
    den = p.sum(-1).view(B, nh, nb * c)[:, :, :T]
    return num, den


def chunked_linear(fq, fk, v, chunk=LINEAR_CHUNK):
    """Σ_{j<=i} φ(q_i)·φ(k_j) v_j for fq, fk: (B, nh, T, F), v: (B, nh, T, hs), in chunks of `chunk`:
    within a chunk the masked (chunk x chunk) products; across chunks the state of all chunks before,
    an exclusive prefix sum of each chunk's φ(K)^T V. Returns (B, nh, T, hs) in fq's dtype."""
    B, nh, T, hs = v.shape
    c = chunk
    n = -(-T // c)
    fq, fk, v = (_pad_to(x, n * c).view(B, nh, n, c, -1) for x in (fq, fk, v))  # (B, nh, n, c, .)
    within = (fq @ fk.transpose(-2, -1)).tril()  # (B, nh, n, c, c): j <= i inside the chunk
    states = fk.transpose(-2, -1) @ v  # (B, nh, n, F, hs): what each chunk adds to S
    before = F.pad(states.cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :-1]  # (B, nh, n, F, hs): S entering each
    num = within @ v + fq @ before  # (B, nh, n, c, hs)
    return num.view(B, nh, n * c, hs)[:, :, :T]


def linear_part(fq, fk, v, shift=0):
    """The linear terms, unnormalised: num_i = Σ_{j<=i-shift} φ(q_i)·φ(k_j) v_j and
    den_i = Σ_{j<=i-shift} φ(q_i)·φ(k_j). Keys and values slide `shift` places later, so that
    "j <= i - shift" becomes plain causal linear attention. fp32 (B, nh, T, hs) and (B, nh, T)."""
    T = fq.shape[2]
    fq, fk, v = _wide(fq), _wide(fk), _wide(v)
    if shift:
        fk, v = (F.pad(x, (0, 0, shift, 0))[:, :, :T] for x in (fk, v))
    den = (fq * fk.cumsum(2)).sum(-1)  # (B, nh, T): φ(q_i)·z_i
    num = _fla_linear(fq, fk, v) if _fla_applies(fq) else chunked_linear(fq, fk, v)
    return num, den


def hedgehog_attend(q, k, v, fq, fk, window, gamma=None):
    """The parallel form of hybrid_attention, for queries and keys at positions 0 .. T-1: the same
    arguments (k, v with the queries' heads), the same result. O(T (window + LINEAR_CHUNK + F)) work
    per channel, not O(T^2)."""
    dtype = v.dtype
    with torch.autocast(q.device.type, enabled=False):
        num, den = linear_part(fq, fk, v, shift=window)
        if window:
            g = _wide(gamma)[:, None]  # (nh, 1)
            num_w, den_w = window_part(q, k, v, window)
            num, den = num + g[..., None] * num_w, den + g * den_w
        return (num / den[..., None]).to(dtype)


# fla-core's kernel, (B, T, H, K) layout, scale 1, no normalisation (done above, with the window's).
_fla_ok = None


def _fla_linear(fq, fk, v):
    o, _ = chunk_linear_attn(fq.transpose(1, 2), fk.transpose(1, 2), v.transpose(1, 2), scale=1.0,
                             normalize=False, head_first=False)
    return o.transpose(1, 2).float()  # (B, nh, T, hs)


def _fla_applies(x):
    if chunk_linear_attn is None or not x.is_cuda:
        return False
    # outside any compiled graph (wrapped here, not decorated: the decorator imports torch._dynamo)
    return _fla_ok if _fla_ok is not None else torch.compiler.disable(_fla_works)(x.device)


def _fla_works(device):
    """Whether fla's kernel runs here and agrees with chunked_linear, tried once on a small input:
    fla-core refuses some kernels on some GPU / Triton pairs, and a silent wrong answer is worse."""
    global _fla_ok
    if _fla_ok is None:
        g = torch.Generator().manual_seed(0)
        fq, fk = (torch.rand(1, 2, 200, 32, generator=g).softmax(-1).to(device) for _ in range(2))
        v = torch.randn(1, 2, 200, 16, generator=g).to(device)
        try:
            want = chunked_linear(fq, fk, v)
            _fla_ok = bool(((_fla_linear(fq, fk, v) - want).norm() / want.norm()) < 1e-2)
            why = "its output differs from the PyTorch path's"
        except Exception as e:  # a refused kernel, a Triton compile error, an API change
            _fla_ok, why = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if not _fla_ok:
            warnings.warn(f"fla-core's chunk_linear_attn is not used ({why}); linear attention runs in "
                          f"PyTorch")
    return _fla_ok


# ------------------------------------------------------------------------------------------------
# Decoding: the state and the window's ring

class LinearAttentionCache:
    """An H layer's decoding state: S = Σ φ(k_j) v_j^T (B, nh, F, hs) and z = Σ φ(k_j) (B, nh, F), in
    fp32, over the tokens that have left the window, and the window's keys and values (attention's
    RingKVCache, None when window = 0). After tokens up to position p: the ring holds p-w+1 .. p, the
    state 0 .. p-w. Its size does not depend on the context."""

    def __init__(self, batch_size, n_head, n_features, head_dim, window, ring, device, dtype):
        dtype = torch.promote_types(dtype, torch.float32)  # fp32, or fp64 for a float64 model
        self.state = torch.zeros(batch_size, n_head, n_features, head_dim, device=device, dtype=dtype)
        self.norm = torch.zeros(batch_size, n_head, n_features, device=device, dtype=dtype)
        self.window, self.ring = window, ring
        self.seen = 0

    def update(self, fk, v, k_pos, pos, k_new, v_new):
        """Fold into the state the keys (φ(k) fk: (B, nh, S, F), v: (B, nh, S, hs), at k_pos: (S,))
        that the window no longer covers once the new tokens at pos: (T,) are in, then put the new
        keys and values (B, nkv, T, hs) in the ring."""
        leaving = (k_pos <= pos[-1] - self.window) & (k_pos != EMPTY)  # (S,)
        fk = fk.to(self.state.dtype) * leaving[:, None]  # a mask, not an index: no data-dependent shapes
        self.state += fk.transpose(-2, -1) @ v.to(self.state.dtype)
        self.norm += fk.sum(2)
        if self.ring is not None:
            self.ring.update(k_new, v_new, pos)
        self.seen += len(pos)

    def nbytes(self):
        return self.state.nbytes + self.norm.nbytes + (self.ring.nbytes() if self.ring is not None else 0)


# ------------------------------------------------------------------------------------------------
# The layer

class LinearAttention(CausalSelfAttention):
    """The H layer: CausalSelfAttention's projections, RoPE and QK-norm (so a softmax layer's weights
    load into it unchanged), with Hedgehog feature maps for queries and keys and, with a window, γ.
    Queries and keys get separate maps (LoLCATs: untied), one per query head; GQA's key/value heads are
    repeated to the query heads before φ. No attention dropout (the output dropout stays)."""

    def __init__(self, config):
        super().__init__(config)
        self.window = config.linear_window  # the softmax window w (0: linear attention only)
        f = config.linear_features or config.head_dim
        self.n_features = 2 * f
        self.feature_q = HedgehogFeatureMap(self.n_head, self.head_dim, f)
        self.feature_k = HedgehogFeatureMap(self.n_head, self.head_dim, f)
        self.window_factor = nn.Parameter(torch.full((self.n_head,), WINDOW_FACTOR_INIT)) \
            if self.window else None

    def feature_parameters(self):
        """What attention transfer trains: the feature maps and the window factor."""
        extra = [self.window_factor] if self.window_factor is not None else []
        return [*self.feature_q.parameters(), *self.feature_k.parameters(), *extra]

    def forward(self, x, pos, cache=None):
        """x: (B, T, C); pos: (T,) absolute positions; cache: a LinearAttentionCache or None."""
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([nh * hs, nkv * hs, nkv * hs], dim=2)
        q = self._position(q.view(B, T, nh, hs).transpose(1, 2), pos)  # (B, nh, T, hs)
        k = self._position(k.view(B, T, nkv, hs).transpose(1, 2), pos)  # (B, nkv, T, hs)
        v = v.view(B, T, nkv, hs).transpose(1, 2)  # (B, nkv, T, hs)
        gamma = torch.sigmoid(self.window_factor) if self.window else None
        fq = self.feature_q(q)  # (B, nh, T, F)
        if cache is None or cache.seen == 0:  # training, or prefill from empty: the parallel form
            ks, vs, k_pos = k, v, pos
            ke, ve = _expand_kv(q, ks, vs)  # (B, nh, T, hs)
            fk = self.feature_k(ke)  # (B, nh, T, F)
            y = hedgehog_attend(q, ke, ve, fq, fk, self.window, gamma)
        else:  # against the cache: the window's keys (ring) and the new ones; the rest is the state
            ring = cache.ring
            ks, vs, k_pos = (k, v, pos) if ring is None else \
                (torch.cat([ring.k, k], 2), torch.cat([ring.v, v], 2), torch.cat([ring.pos, pos]))
            ke, ve = _expand_kv(q, ks, vs)  # (B, nh, S, hs)
            fk = self.feature_k(ke)  # (B, nh, S, F)
            y = hybrid_attention(q, ke, ve, fq, fk, self.window, gamma, pos, k_pos, (cache.state, cache.norm))
        if cache is not None:
            cache.update(fk, ve, k_pos, pos, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, nh * hs)  # (B, T, nh hs)
        return self.resid_dropout(self.c_proj(y))

    def new_cache(self, batch_size, max_len, device, dtype):
        ring = RingKVCache(batch_size, min(self.window, max_len), self.n_kv_head, self.head_dim, device,
                           dtype) if self.window else None
        return LinearAttentionCache(batch_size, self.n_head, self.n_features, self.head_dim, self.window,
                                    ring, device, dtype)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward): 6 per weight (the feature maps' too), plus per
        head, in the PaLM way of counting attention (3 x the forward's 2 per multiply-add): the window
        part as a local layer, 12 w hs; the linear part within a chunk, 6 c (F + hs); and the state,
        written and read, 12 F hs."""
        weights = sum(p.numel() for p in (self.c_attn.weight, self.c_proj.weight,
                                          self.feature_q.weight, self.feature_k.weight))
        w, c, n = min(self.window, seq_len), min(LINEAR_CHUNK, seq_len), self.n_features
        hs = self.head_dim
        return 6 * weights + self.n_head * (12 * w * hs + 6 * c * (n + hs) + 12 * n * hs)


# ------------------------------------------------------------------------------------------------
# Linearizing a trained model (LoLCATs)

def linearized_config(config, window=64, features=0):
    """`config` with every attention letter (G, L) of the layer pattern turned into H."""
    if config.attn != "mha" or config.attn_experts or config.kv_share > 1 or config.mod_every:
        raise ValueError("linearizing needs plain multi-head attention layers (attn='mha', attn_experts=0, "
                         "kv_share=1, mod_every=0): an H layer takes its q, k, v and output projections "
                         "from one softmax layer")
    if not set(config.layers) & set(ATTENTION_LETTERS):
        raise ValueError(f"layers={config.layers!r} has no attention layer (G, L) to linearize")
    layers = "".join("H" if c in ATTENTION_LETTERS else c for c in config.layers)
    return dataclasses.replace(config, layers=layers, linear_window=window, linear_features=features)


def linearized(teacher, window=64, features=0):
    """A copy of the GPT `teacher` whose attention layers are H layers holding the softmax layers'
    weights; everything else is copied too. New (and not loaded): the feature maps and γ."""
    student = type(teacher)(linearized_config(teacher.config, window, features))  # a GPT (model.py
    #                                                                                 imports this file)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    new = {f"blocks.{i}.mixer.{name}" for i, block in enumerate(student.blocks)
           if isinstance(block.mixer, LinearAttention) for name, _ in block.mixer.named_parameters()
           if name.startswith(("feature_", "window_factor"))}
    if unexpected or set(missing) != new:
        raise ValueError(f"the teacher's weights do not fit the linearized model: missing "
                         f"{sorted(set(missing) - new)}, unexpected {unexpected}")
    ref = next(teacher.parameters())
    return student.to(device=ref.device, dtype=ref.dtype)


def transfer_parameters(model):
    """The parameters attention transfer trains: every H layer's feature maps and window factor."""
    return [p for m in model.modules() if isinstance(m, LinearAttention) for p in m.feature_parameters()]


def transfer_loss(teacher, student, idx):
    """Attention transfer. One forward of the teacher (no grad) on idx: (B, T) records each attention
    layer's input and output; each H layer of the student is fed that same input. Returns the MSE of
    each H layer's output to its softmax layer's, (n_linearized,), in layer order."""
    kinds = teacher.config.layer_kinds()
    layers = [i for i, c in enumerate(student.config.layer_kinds()) if c == "H" and kinds[i] in ATTENTION_LETTERS]
    seen = {}
    hooks = [teacher.blocks[i].mixer.register_forward_hook(
        lambda module, args, out, i=i: seen.__setitem__(i, (args[0], args[1], out))) for i in layers]
    try:
        with torch.no_grad():
            teacher(idx)
    finally:
        for h in hooks:
            h.remove()
    return torch.stack([F.mse_loss(student.blocks[i].mixer(x, pos).float(), y.float())
                        for i, (x, pos, y) in ((i, seen[i]) for i in layers)])
