"""Mamba-2: a selective state-space layer whose scan is computed as chunked matrix products (SSD).

Dao & Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms Through Structured State
Space Duality", arXiv 2405.21060. Each head keeps a state H_t (P x N) that decays by one scalar per
token and adds an outer product of its input with B_t; the output reads the state through C_t:

    z, x, B, C, dt = split(u W_in)                      gate, input, input map, output map, step size
    x, B, C = silu(causal_depthwise_conv([x, B, C]))     a short convolution over the last d_conv tokens
    dt = softplus(dt + dt_bias),  A = -exp(A_log)         a step size per token and head; A < 0
    H_t = exp(dt_t A) H_{t-1} + (dt_t x_t) B_t^T          (P x N) per head; B, C shared within a group
    y_t = H_t C_t + D x_t                                 skip D
    out = RMSNorm(y * silu(z)) W_out                      gated RMSNorm (per group), output projection

State space duality: unrolled, y = (L o C B^T)(dt x) with L[t, s] = exp(a_{s+1} + ... + a_t),
a_t = dt_t A, for s <= t (0 above the diagonal): masked attention whose mask is a decay. The chunked
algorithm cuts the sequence into chunks of Q tokens. Inside a chunk it uses that quadratic form
(matrix products, good for tensor cores); across chunks it carries the state by the recurrence
H_c = exp(a summed over chunk c) H_{c-1} + S_c, where S_c is the state chunk c builds from its own
tokens. Work per token is O(Q (P + N)) per head, not attention's O(T).

Paths. Reference: `ssd_recurrent` (token by token, the tests' oracle) and `ssd_chunked` (plain
PyTorch without data-dependent Python control flow, so torch.compile traces it whole). Its last step,
each token's output from its chunk (`chunk_output`: the Q x Q decay-masked product and the state
entering the chunk), runs on a GPU as the Triton kernels of `ChunkOutput` (forward and backward),
which keep the Q x Q blocks in registers, when GPT_TRITON=1 is set (opt-in until their speed is
measured); elsewhere it runs the reference (torch.compile leaves the kernels outside its graph: a
graph break). The kernels are verified on the CPU by Triton's interpreter (fp32, against the
reference: output, gradients, the whole scan) and by building them for the H100 (sm_90a, bf16, no
register spills), and on an H100 (2026-12-07) they equal the reference, output and all five
gradients, in fp32 and bf16 at three shapes, the bench's included. NOT yet run there: a compiled
model through them, and any timing. `ssd()` picks the Triton kernel
`mamba_chunk_scan_combined` of `mamba-ssm` on a GPU when it imports, and the conv uses
`causal_conv1d_fn` of `causal-conv1d` when that imports; neither installs on our machines (mamba-ssm
needs its compiled CUDA extension), so both branches are unverified here. fla-core's scalar-decay
kernels compute the same recurrence, but its gated kernels refuse Hopper with Triton < 3.7.1 (the
H100 has 3.6), so they are not wired in. Measured before the kernels (bench/RESULTS.md, H100,
T = 8192, GPT-2-124M width): the compiled chunked form takes 1.4x a global attention layer's time
(fwd + bwd), because its Q x Q decay blocks and per-chunk states pass through GPU memory.

Decoding keeps a fixed-size `MambaCache` per layer: the last d_conv - 1 inputs of the conv and the
SSM state (h x P x N, fp32), so memory per sequence does not grow with the context. A cached forward
of T > 1 tokens is a chunked prefill that starts from the cached state; T = 1 is one recurrence step.
Config: mamba_d_state (N), mamba_d_conv, mamba_expand, mamba_head_dim (P), mamba_n_groups (g),
mamba_chunk_size (Q); the letter M in `layers`.
"""

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

try:  # the fast path of chunk_output (below); CUDA builds of torch bring Triton with them
    import triton
    import triton.language as tl
except ImportError:
    triton = None

try:  # optional fast paths: https://github.com/state-spaces/mamba, https://github.com/Dao-AILab/causal-conv1d
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
except ImportError:
    mamba_chunk_scan_combined = None
try:
    from causal_conv1d import causal_conv1d_fn
except ImportError:
    causal_conv1d_fn = None


# ------------------------------------------------------------------------------------------------
# The scan. Shapes: x (b, T, h, P) inputs, dt (b, T, h) positive step sizes, A (h,) negative,
# B and C (b, T, g, N) with head i reading group i // (h // g), states (b, h, P, N).
# The skip D x is added by the layer, not here.

def ssd_step(x, dt, A, B, C, state):
    """One token of the recurrence. x: (b, h, P), dt: (b, h), B, C: (b, g, N), state: (b, h, P, N).
    Returns y: (b, h, P) and the new state (in the state's dtype)."""
    r = x.shape[1] // B.shape[1]  # heads per group
    B = B.repeat_interleave(r, dim=1).to(state.dtype)  # (b, h, N)
    C = C.repeat_interleave(r, dim=1).to(state.dtype)  # (b, h, N)
    decay = torch.exp(dt * A).to(state.dtype)  # (b, h)
    dtx = (dt[..., None] * x).to(state.dtype)  # (b, h, P)
    state = state * decay[..., None, None] + dtx[..., None] * B[:, :, None, :]  # (b, h, P, N)
    y = torch.einsum("bhpn,bhn->bhp", state, C)  # (b, h, P)
    return y, state


def ssd_recurrent(x, dt, A, B, C, initial_state=None):
    """H_t = exp(dt_t A) H_{t-1} + (dt_t x_t) B_t^T,  y_t = H_t C_t, one token at a time (a Python
    loop over T: slow, but obviously right). Returns (y: (b, T, h, P), final state: (b, h, P, N))."""
    b, T, h, P = x.shape
    state = initial_state if initial_state is not None else x.new_zeros(b, h, P, B.shape[-1])
    ys = []
    for t in range(T):
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def segsum(a):
    """a: (..., n) -> (..., n, n) with out[i, j] = a_{j+1} + ... + a_i for j <= i (0 on the diagonal)
    and -inf for j > i, so exp(out) is the decay from step j to step i. Summed directly rather than
    as a difference of two cumulative sums, which would lose precision over long sequences."""
    n = a.shape[-1]
    a = a[..., None].expand(*a.shape, n)  # (..., n, n): a[..., i, j] = a_i
    a = a.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=a.device).tril(-1), 0)  # keep i > j
    s = a.cumsum(dim=-2)  # (..., n, n): s[i, j] = sum of a_k over j < k <= i
    return s.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def chunk_output(a_cum, C, B, xdt, H):
    """Each token's output from its own chunk: the dual (attention-like) form over the chunk's
    tokens up to it, plus what the state entering the chunk gives it,

        y[l] = sum_{s <= l} exp(a_cum[l] - a_cum[s]) (C_l . B_s) xdt_s  +  exp(a_cum[l]) H C_l,

    i.e. y = (L o C B^T) xdt + diag(exp(a_cum)) C H^T per chunk and head, with
    L[l, s] = exp(a_cum[l] - a_cum[s]) for s <= l (within a chunk the difference is exact enough).
    a_cum: (b, c, h, Q) fp32, the log-decay from the chunk's start to each token; C, B:
    (b, c, Q, g, N); xdt: (b, c, Q, g, r, P); H: (b, c, g, r, P, N), the state entering each chunk.
    Returns (b, c, Q, g, r, P) in xdt's dtype. Plain PyTorch: the reference for `ChunkOutput`."""
    b, c, Q, g, r, P = xdt.shape
    dtype = xdt.dtype
    causal = torch.ones(Q, Q, dtype=torch.bool, device=xdt.device).tril()
    L = torch.exp((a_cum[..., :, None] - a_cum[..., None, :]).masked_fill(~causal, float("-inf")))  # (b, c, h, Q, Q)
    CB = torch.einsum("bclgn,bcsgn->bcgls", C, B)  # (b, c, g, Q, Q), shared by the group's heads
    M = (CB[:, :, :, None] * L.view(b, c, g, r, Q, Q)).to(dtype)  # (b, c, g, r, Q, Q)
    y_diag = torch.einsum("bcgrls,bcsgrp->bclgrp", M, xdt)  # (b, c, Q, g, r, P)
    decay_from_start = torch.exp(a_cum).transpose(2, 3).reshape(b, c, Q, g, r, 1)
    y_off = torch.einsum("bclgn,bcgrpn->bclgrp", C, H) * decay_from_start.to(dtype)  # (b, c, Q, g, r, P)
    return y_diag + y_off


def ssd_chunked(x, dt, A, B, C, chunk_size, initial_state=None):
    """The same recurrence in chunks of Q = chunk_size tokens, in three steps: (1) the state each
    chunk builds from its own tokens, (2) the recurrence across chunks (written as one small
    (c+1) x (c+1) decay matrix product, so that the whole function is a fixed graph of matrix
    products for torch.compile), (3) each token's output from its chunk and the state entering it
    (`chunk_output`; the Triton kernels of `ChunkOutput` on a GPU). Decays are computed in dt's
    dtype (fp32), the matrix products and states in x's (bf16 under autocast).
    Returns (y: (b, T, h, P), final state: (b, h, P, N)), both in x's dtype."""
    b, T, h, P = x.shape
    g, N = B.shape[-2:]
    r = h // g  # heads per group
    dtype = x.dtype
    Q = min(chunk_size, T)
    pad = -T % Q
    if pad:  # dt = 0 and x = 0 on the padding: decay 1 and no input, so the final state is unchanged
        x, dt, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    c = (T + pad) // Q  # number of chunks
    a = (dt * A).view(b, c, Q, h).transpose(2, 3)  # (b, c, h, Q): log-decay of each step, <= 0
    a_cum = a.cumsum(dim=-1)  # (b, c, h, Q): log-decay from the chunk's start to each token
    xdt = (x * dt[..., None]).to(dtype).view(b, c, Q, g, r, P)  # (b, c, Q, g, r, P)
    B, C = B.to(dtype).view(b, c, Q, g, N), C.to(dtype).view(b, c, Q, g, N)  # (b, c, Q, g, N)

    # 1. the state each chunk builds from its own tokens, decayed to the chunk's end
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum).transpose(2, 3).reshape(b, c, Q, g, r, 1)
    S = torch.einsum("bclgn,bclgrp->bcgrpn", B, xdt * decay_to_end.to(dtype))  # (b, c, g, r, P, N)

    # 2. across chunks: H_c = exp(sum of a over chunk c) H_{c-1} + S_c, for all c at once; the
    #    decays between chunks come from segsum, which stays exact however long the sequence
    if initial_state is None:
        initial_state = torch.zeros(b, h, P, N, device=x.device, dtype=dtype)
    S = torch.cat([initial_state.to(dtype).view(b, 1, g, r, P, N), S], dim=1)  # (b, c+1, g, r, P, N)
    chunk_decay = a_cum[..., -1].transpose(1, 2).reshape(b, g, r, c)  # (b, g, r, c): log-decay of each chunk
    decay_chunks = torch.exp(segsum(F.pad(chunk_decay, (1, 0)))).to(dtype)  # (b, g, r, c+1, c+1)
    H = torch.einsum("bgrzc,bcgrpn->bzgrpn", decay_chunks, S)  # (b, c+1, g, r, P, N): H[z] ends chunk z-1
    H, final_state = H[:, :-1], H[:, -1]  # the state entering each chunk; the state after the last

    # 3. each token's output: the dual form inside its chunk plus the state entering the chunk
    output = chunk_output_triton if use_triton(x) else chunk_output
    y = output(a_cum, C, B, xdt, H)  # (b, c, Q, g, r, P)
    y = y.reshape(b, c * Q, h, P)[:, :T]  # (b, T, h, P)
    return y, final_state.reshape(b, h, P, N)


# ------------------------------------------------------------------------------------------------
# The Triton fast path of chunk_output: the Q x Q blocks C B^T, L and M live only in registers,
# one BQ x BQ tile at a time, instead of passing through GPU memory as (b, c, h, Q, Q) tensors.
# Each program owns one tile of rows (or columns) of one chunk and head and loops over the tiles
# it meets on the other side of the diagonal. Layouts, all contiguous: a_cum (b c, h, Q);
# C, B (b c, Q, g, N); xdt, y (b c, Q, h, P); H (b c, h, P, N); head i reads group i // (h / g).
#
# Backward, with M = CB o L, G = dM o M and e_l = exp(a_cum[l]) (derivatives of y above):
#     dxdt = M^T dy                         dM = dy xdt^T (masked to s <= l)
#     dC = (dM o L) B + diag(e) dy H        dB = (dM o L)^T C       (summed over the group's heads)
#     dH = (diag(e) dy)^T C                 da[l] = sum_s G[l, s] - sum_s G[s, l] + e_l dy_l . (H C_l)
# The rows kernel gives dC and the row sums of da, the columns kernel dxdt, dB and the column sums,
# a third kernel dH. The heads of a group add their dC and dB into one fp32 buffer with atomics:
# a per-head buffer would be r times the gradient (24 times, 200 MB of fp32, at the bench shape),
# and looping over the group's heads inside one program would leave b c g Q / BQ programs (512 for
# the backward at the bench shape, under four per SM). The price: B's and C's gradients are summed
# in a run-dependent order, so they are not bitwise reproducible.

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter: the kernels take CPU tensors
# The Triton kernels serve CUDA tensors only when TRITON is set (environment: GPT_TRITON=1). On the
# H100 they equal the reference (tests/test_mamba.py, 2026-12-07: fp32 and bf16, the bench shape
# included), but the compiled model through them and their speed are not measured yet, so the
# compiled PyTorch path stays the default.
TRITON = os.environ.get("GPT_TRITON") == "1"


def use_triton(x):
    """The Triton kernels run on a CUDA tensor when TRITON is set, and anywhere under the interpreter."""
    return triton is not None and ((TRITON and x.is_cuda) or INTERPRET)


if triton is not None:
    @triton.jit
    def _load_rows(ptr, rows, cols, n_rows, n_cols, row_stride):
        """A (len(rows), len(cols)) tile of a matrix stored with `row_stride` between rows; zeros
        outside n_rows x n_cols."""
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        return tl.load(ptr + rows[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)

    # The tiles the kernels read, one chunk at a time. Contiguous layouts: a_cum (b·c, h, Q);
    # B, C (b·c, Q, g, N); xdt, dy (b·c, Q, h, P); H (b·c, h, P, N).

    @triton.jit
    def _a_rows(a_ptr, chunk, head, h, Q, rows):
        """a_cum of one chunk and head at tokens rows (len(rows),); 0 beyond Q."""
        return tl.load(a_ptr + (chunk * h + head) * Q + rows, mask=rows < Q, other=0.0)

    @triton.jit
    def _group_rows(ptr, chunk, grp, g, Q, N, rows, n):
        """B or C of one chunk and group at tokens rows: (len(rows), len(n))."""
        return _load_rows(ptr + (chunk * Q * g + grp) * N, rows, n, Q, N, g * N)

    @triton.jit
    def _head_rows(ptr, chunk, head, h, Q, P, rows, p):
        """xdt or dy of one chunk and head at tokens rows: (len(rows), len(p))."""
        return _load_rows(ptr + (chunk * Q * h + head) * P, rows, p, Q, P, h * P)

    @triton.jit
    def _decay(a_l, a_s, l, s, Q):
        """L on a tile, from rows l and columns s broadcast against each other (either way round):
        exp(a_cum[l] - a_cum[s]) where s <= l < Q, else 0 (exp(-inf): never inf above the diagonal)."""
        return tl.exp(tl.where((s <= l) & (l < Q), a_l - a_s, float("-inf")))

    @triton.jit
    def _chunk_output_fwd(a_ptr, C_ptr, B_ptr, x_ptr, H_ptr, y_ptr, h, g, Q, N, P,
                          BQ: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr):
        """y for rows l of one tile, chunk and head: e_l C_l H^T, then (L o C B^T) xdt over the
        column tiles s <= l."""
        tile, chunk, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        grp = head // (h // g)
        l = tile * BQ + tl.arange(0, BQ)  # (BQ,)
        n, p = tl.arange(0, BN), tl.arange(0, BP)
        a_l = _a_rows(a_ptr, chunk, head, h, Q, l)  # (BQ,)
        C_l = _group_rows(C_ptr, chunk, grp, g, Q, N, l, n)  # (BQ, BN)
        H = _load_rows(H_ptr + (chunk * h + head) * P * N, p, n, P, N, N)  # (BP, BN)
        y = tl.dot(C_l, tl.trans(H), input_precision="ieee") * tl.exp(a_l)[:, None]  # (BQ, BP)
        for s0 in range(0, (tile + 1) * BQ, BQ):
            s = s0 + tl.arange(0, BQ)  # (BQ,)
            a_s = _a_rows(a_ptr, chunk, head, h, Q, s)  # (BQ,)
            B_s = _group_rows(B_ptr, chunk, grp, g, Q, N, s, n)  # (BQ, BN)
            x_s = _head_rows(x_ptr, chunk, head, h, Q, P, s, p)  # (BQ, BP)
            CB = tl.dot(C_l, tl.trans(B_s), input_precision="ieee")  # (BQ, BQ)
            M = CB * _decay(a_l[:, None], a_s[None, :], l[:, None], s[None, :], Q)  # (BQ, BQ)
            y += tl.dot(M.to(x_s.dtype), x_s, input_precision="ieee")  # (BQ, BP)
        mask = (l[:, None] < Q) & (p[None, :] < P)
        tl.store(y_ptr + (chunk * Q * h + head) * P + l[:, None] * h * P + p[None, :],
                 y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _chunk_output_bwd_rows(a_ptr, C_ptr, B_ptr, x_ptr, H_ptr, dy_ptr, dC_ptr, da_ptr, h, g, Q, N, P,
                               BQ: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr):
        """For rows l of one tile, chunk and head: dC_l (added into the group's fp32 buffer) and
        d a_cum[l]'s row sums, e_l dy_l . (H C_l) + sum_{s <= l} G[l, s] (stored; the columns
        kernel adds the rest)."""
        tile, chunk, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        grp = head // (h // g)
        l = tile * BQ + tl.arange(0, BQ)  # (BQ,)
        n, p = tl.arange(0, BN), tl.arange(0, BP)
        a_l = _a_rows(a_ptr, chunk, head, h, Q, l)  # (BQ,)
        e_l = tl.exp(a_l)  # (BQ,)
        C_l = _group_rows(C_ptr, chunk, grp, g, Q, N, l, n)  # (BQ, BN)
        dy_l = _head_rows(dy_ptr, chunk, head, h, Q, P, l, p)  # (BQ, BP)
        H = _load_rows(H_ptr + (chunk * h + head) * P * N, p, n, P, N, N)  # (BP, BN)
        dC = tl.dot(dy_l, H, input_precision="ieee") * e_l[:, None]  # (BQ, BN)
        CH = tl.dot(C_l, tl.trans(H), input_precision="ieee")  # (BQ, BP)
        da = tl.sum(dy_l.to(tl.float32) * CH, axis=1) * e_l  # (BQ,)
        for s0 in range(0, (tile + 1) * BQ, BQ):
            s = s0 + tl.arange(0, BQ)  # (BQ,)
            a_s = _a_rows(a_ptr, chunk, head, h, Q, s)  # (BQ,)
            B_s = _group_rows(B_ptr, chunk, grp, g, Q, N, s, n)  # (BQ, BN)
            x_s = _head_rows(x_ptr, chunk, head, h, Q, P, s, p)  # (BQ, BP)
            CB = tl.dot(C_l, tl.trans(B_s), input_precision="ieee")  # (BQ, BQ)
            dM = tl.dot(dy_l, tl.trans(x_s), input_precision="ieee")  # (BQ, BQ)
            dCB = dM * _decay(a_l[:, None], a_s[None, :], l[:, None], s[None, :], Q)  # (BQ, BQ)
            dC += tl.dot(dCB.to(B_s.dtype), B_s, input_precision="ieee")  # (BQ, BN)
            da += tl.sum(dCB * CB, axis=1)  # (BQ,)
        mask = (l[:, None] < Q) & (n[None, :] < N)
        tl.atomic_add(dC_ptr + (chunk * Q * g + grp) * N + l[:, None] * g * N + n[None, :], dC, mask=mask)
        tl.store(da_ptr + (chunk * h + head) * Q + l, da, mask=l < Q)

    @triton.jit
    def _chunk_output_bwd_cols(a_ptr, C_ptr, B_ptr, x_ptr, dy_ptr, dx_ptr, dB_ptr, da_ptr, h, g, Q, N, P,
                               BQ: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr):
        """For columns s of one tile, chunk and head, over the row tiles l >= s: dxdt_s, dB_s (added
        into the group's fp32 buffer) and - sum_l G[l, s], added to what the rows kernel stored."""
        tile, chunk, head = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        grp = head // (h // g)
        s = tile * BQ + tl.arange(0, BQ)  # (BQ,)
        n, p = tl.arange(0, BN), tl.arange(0, BP)
        a_s = _a_rows(a_ptr, chunk, head, h, Q, s)  # (BQ,)
        B_s = _group_rows(B_ptr, chunk, grp, g, Q, N, s, n)  # (BQ, BN)
        x_s = _head_rows(x_ptr, chunk, head, h, Q, P, s, p)  # (BQ, BP)
        dx = tl.zeros((BQ, BP), dtype=tl.float32)
        dB = tl.zeros((BQ, BN), dtype=tl.float32)
        da = tl.zeros((BQ,), dtype=tl.float32)
        for l0 in range(tile * BQ, Q, BQ):
            l = l0 + tl.arange(0, BQ)  # (BQ,)
            a_l = _a_rows(a_ptr, chunk, head, h, Q, l)  # (BQ,)
            C_l = _group_rows(C_ptr, chunk, grp, g, Q, N, l, n)  # (BQ, BN)
            dy_l = _head_rows(dy_ptr, chunk, head, h, Q, P, l, p)  # (BQ, BP)
            Lt = _decay(a_l[None, :], a_s[:, None], l[None, :], s[:, None], Q)  # (BQ, BQ): L transposed, [s, l]
            Mt = tl.dot(B_s, tl.trans(C_l), input_precision="ieee") * Lt  # (BQ, BQ)
            dx += tl.dot(Mt.to(dy_l.dtype), dy_l, input_precision="ieee")  # (BQ, BP)
            dMt = tl.dot(x_s, tl.trans(dy_l), input_precision="ieee")  # (BQ, BQ)
            dB += tl.dot((dMt * Lt).to(C_l.dtype), C_l, input_precision="ieee")  # (BQ, BN)
            da -= tl.sum(dMt * Mt, axis=1)  # (BQ,)
        tl.store(dx_ptr + (chunk * Q * h + head) * P + s[:, None] * h * P + p[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=(s[:, None] < Q) & (p[None, :] < P))
        tl.atomic_add(dB_ptr + (chunk * Q * g + grp) * N + s[:, None] * g * N + n[None, :], dB,
                      mask=(s[:, None] < Q) & (n[None, :] < N))
        da_s = da_ptr + (chunk * h + head) * Q + s
        tl.store(da_s, tl.load(da_s, mask=s < Q, other=0.0) + da, mask=s < Q)

    @triton.jit
    def _chunk_output_bwd_dh(a_ptr, C_ptr, dy_ptr, dH_ptr, h, g, Q, N, P,
                             BQ: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr):
        """dH = (diag(e) dy)^T C for one chunk and head, over the chunk's row tiles."""
        chunk, head = tl.program_id(1), tl.program_id(2)
        grp = head // (h // g)
        n, p = tl.arange(0, BN), tl.arange(0, BP)
        dH = tl.zeros((BP, BN), dtype=tl.float32)
        for l0 in range(0, Q, BQ):
            l = l0 + tl.arange(0, BQ)  # (BQ,)
            a_l = _a_rows(a_ptr, chunk, head, h, Q, l)  # (BQ,)
            C_l = _group_rows(C_ptr, chunk, grp, g, Q, N, l, n)  # (BQ, BN)
            dy_l = _head_rows(dy_ptr, chunk, head, h, Q, P, l, p)  # (BQ, BP)
            dy_l = (dy_l.to(tl.float32) * tl.exp(a_l)[:, None]).to(C_l.dtype)  # (BQ, BP)
            dH += tl.dot(tl.trans(dy_l), C_l, input_precision="ieee")  # (BP, BN)
        tl.store(dH_ptr + (chunk * h + head) * P * N + p[:, None] * N + n[None, :],
                 dH.to(dH_ptr.dtype.element_ty), mask=(p[:, None] < P) & (n[None, :] < N))

    # (BQ, num_warps) per kernel, for the bench shape (N = 128, P = 64, bf16). Registers per thread
    # that ptxas reports for sm_90a (tests/test_mamba.py builds them): forward 168, rows 225,
    # columns 240, dH 98, none spilled; the backward kernels keep more blocks live and spill with
    # 64 x 64 tiles (rows 164 bytes, columns 160 at 8 warps, more at 4).
    CHUNK_OUTPUT_TILES = {_chunk_output_fwd: (64, 4), _chunk_output_bwd_rows: (32, 8),
                          _chunk_output_bwd_cols: (32, 8), _chunk_output_bwd_dh: (32, 8)}

    def chunk_output_config(kernel, Q, N, P):
        """A kernel's tile sizes and warps: BQ x BQ tiles of the Q x Q block, N and P whole (padded
        to powers of two, at least 16 for tl.dot)."""
        BQ, num_warps = CHUNK_OUTPUT_TILES[kernel]
        return dict(BQ=min(BQ, max(16, triton.next_power_of_2(Q))), BN=max(16, triton.next_power_of_2(N)),
                    BP=max(16, triton.next_power_of_2(P)), num_warps=num_warps)

    class ChunkOutput(torch.autograd.Function):
        """`chunk_output` by the Triton kernels above, forward and backward. Inputs as there, all in
        one dtype but a_cum (fp32); fp32 inputs multiply exactly (ieee, no TF32), bf16 on the tensor
        cores with fp32 accumulation."""

        @staticmethod
        def forward(ctx, a_cum, C, B, xdt, H):
            a_cum, C, B, xdt, H = (t.contiguous() for t in (a_cum, C, B, xdt, H))
            ctx.save_for_backward(a_cum, C, B, xdt, H)
            y = torch.empty_like(xdt)  # (b, c, Q, g, r, P)
            _launch(_chunk_output_fwd, (a_cum, C, B, xdt, H, y), xdt.shape, C.shape[-1])
            return y

        @staticmethod
        def backward(ctx, dy):
            a_cum, C, B, xdt, H = ctx.saved_tensors
            dy = dy.contiguous()  # (b, c, Q, g, r, P)
            dC = torch.zeros(C.shape, device=C.device, dtype=torch.float32)  # (b, c, Q, g, N)
            dB = torch.zeros(B.shape, device=B.device, dtype=torch.float32)  # (b, c, Q, g, N)
            da = torch.empty_like(a_cum)  # (b, c, h, Q)
            dxdt, dH = torch.empty_like(xdt), torch.empty_like(H)
            sizes = xdt.shape, C.shape[-1]
            _launch(_chunk_output_bwd_rows, (a_cum, C, B, xdt, H, dy, dC, da), *sizes)
            _launch(_chunk_output_bwd_cols, (a_cum, C, B, xdt, dy, dxdt, dB, da), *sizes)  # adds to rows' da
            _launch(_chunk_output_bwd_dh, (a_cum, C, dy, dH), *sizes, tiles=1)
            return da, dC.to(C.dtype), dB.to(B.dtype), dxdt, dH

    def _launch(kernel, tensors, xdt_shape, N, tiles=None):
        """kernel[grid](*tensors, sizes, tiles) on the grid (row or column tiles, b c chunks, h heads)."""
        b, c, Q, g, r, P = xdt_shape
        config = chunk_output_config(kernel, Q, N, P)
        grid = (tiles or triton.cdiv(Q, config["BQ"]), b * c, g * r)
        kernel[grid](*tensors, g * r, g, Q, N, P, **config)

    @torch.compiler.disable
    def chunk_output_triton(a_cum, C, B, xdt, H):
        """ChunkOutput, called eagerly under torch.compile (a graph break): the kernels launch as
        they are, without Dynamo tracing their Python launch code."""
        return ChunkOutput.apply(a_cum, C, B, xdt, H)


def ssd(x, dt, A, B, C, chunk_size, initial_state=None):
    """The chunked scan on the fastest path available: mamba-ssm's Triton kernel on a GPU when it
    imports (unverified here: it does not install on our machines), else `ssd_chunked`."""
    if mamba_chunk_scan_combined is not None and x.is_cuda:
        return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, initial_states=initial_state,
                                         return_final_states=True)
    return ssd_chunked(x, dt, A, B, C, chunk_size, initial_state)


# ------------------------------------------------------------------------------------------------
# The layer

class MambaCache:
    """What a Mamba-2 layer needs to continue a sequence, whatever its length: the last d_conv - 1
    inputs of the convolution (b, d_conv - 1, conv_dim) and the SSM state (b, h, P, N), kept in fp32
    (it is a running sum, updated every token)."""

    def __init__(self, batch_size, conv_dim, d_conv, n_head, head_dim, d_state, device, dtype):
        self.conv = torch.zeros(batch_size, d_conv - 1, conv_dim, device=device, dtype=dtype)
        self.ssm = torch.zeros(batch_size, n_head, head_dim, d_state, device=device,
                               dtype=torch.promote_types(dtype, torch.float32))

    def nbytes(self):
        return self.conv.nbytes + self.ssm.nbytes


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) * g, normalised over each group's channels (Mamba-2's gated norm with
    norm_before_gate=False)."""

    def __init__(self, dim, n_groups=1, eps=1e-5):
        super().__init__()
        self.n_groups, self.eps = n_groups, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y, z):
        y = y * F.silu(z)  # (..., dim)
        groups = y.view(*y.shape[:-1], self.n_groups, -1)  # (..., g, dim / g)
        return F.rms_norm(groups, (groups.shape[-1],), eps=self.eps).view(y.shape) * self.weight


class Mamba2(nn.Module):
    """The Mamba-2 mixer: forward(u, pos, cache) -> (b, T, C), as the other mixers (model.py)."""

    def __init__(self, config, d_state=None, d_conv=None, expand=None, head_dim=None, n_groups=None,
                 chunk_size=None, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, A_init_range=(1, 16)):
        # The paper's defaults: d_state 128, d_conv 4, expand 2, head_dim 64, n_groups 1, chunk 256;
        # config fields unless given here.
        super().__init__()
        C = config.n_embd
        self.d_state = N = d_state or config.mamba_d_state
        self.d_conv = d_conv or config.mamba_d_conv
        self.d_inner = (expand or config.mamba_expand) * C
        self.head_dim = head_dim or config.mamba_head_dim
        self.n_groups = n_groups or config.mamba_n_groups
        self.chunk_size = chunk_size or config.mamba_chunk_size
        self.n_head = h = self.d_inner // self.head_dim
        self.conv_dim = self.d_inner + 2 * self.n_groups * N  # the conv runs over x, B and C
        self.in_proj = nn.Linear(C, self.d_inner + self.conv_dim + h, bias=config.bias)  # z, xBC, dt
        # depthwise: one filter of d_conv taps per channel (the module holds the weights and
        # PyTorch's default init; _conv applies them)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim)
        # dt_bias: softplus^-1 of step sizes log-uniform in [dt_min, dt_max]; A = -exp(A_log) with
        # -A uniform in A_init_range; D = 1 (Mamba-2's init)
        dt = torch.exp(torch.rand(h) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # (h,)
        self.A_log = nn.Parameter(torch.log(torch.empty(h).uniform_(*A_init_range)))  # (h,)
        self.D = nn.Parameter(torch.ones(h))  # (h,)
        self.norm = GatedRMSNorm(self.d_inner, self.n_groups)
        self.out_proj = nn.Linear(self.d_inner, C, bias=config.bias)
        self.out_proj.residual = True  # scaled init (model.py)
        self.dropout = nn.Dropout(config.dropout)

    def _conv(self, xBC, cache):
        """Causal depthwise conv + silu over time. xBC: (b, T, conv_dim) -> (b, T, conv_dim).
        Written as K shifted multiply-adds, which torch.compile fuses into one kernel: PyTorch's
        depthwise conv1d kernels took 17% of the layer's time on the H100 (fwd + bwd, T = 8192)."""
        K, T = self.d_conv, xBC.shape[1]
        if cache is None:
            if causal_conv1d_fn is not None and xBC.is_cuda:  # unverified here (does not install)
                w = self.conv1d.weight.squeeze(1)  # (conv_dim, K)
                y = causal_conv1d_fn(xBC.transpose(1, 2), w, self.conv1d.bias, activation="silu")
                return y.transpose(1, 2)
            xpad = F.pad(xBC, (0, 0, K - 1, 0))  # (b, K-1+T, conv_dim): zeros before the first token
        else:
            xpad = torch.cat([cache.conv, xBC.to(cache.conv.dtype)], dim=1)  # (b, K-1+T, conv_dim)
            cache.conv.copy_(xpad[:, xpad.shape[1] - (K - 1):])  # the last K-1 inputs
        w = self.conv1d.weight.squeeze(1).to(xpad.dtype)  # (conv_dim, K)
        y = self.conv1d.bias.to(xpad.dtype) + sum(xpad[:, k:k + T] * w[:, k] for k in range(K))
        return F.silu(y)  # (b, T, conv_dim)

    def forward(self, u, pos=None, cache=None):
        """u: (b, T, C); pos is unused (the layer has no notion of position beyond order);
        cache: a MambaCache or None. With a cache, the T tokens continue the cached sequence."""
        b, T, _ = u.shape
        h, P, g, N = self.n_head, self.head_dim, self.n_groups, self.d_state
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, h], dim=-1)
        x, B, C = self._conv(xBC, cache).split([self.d_inner, g * N, g * N], dim=-1)
        x = x.reshape(b, T, h, P)  # (b, T, h, P)
        B, C = B.reshape(b, T, g, N), C.reshape(b, T, g, N)  # (b, T, g, N)
        f32 = torch.promote_types(self.A_log.dtype, torch.float32)  # fp32, or fp64 in the fp64 tests
        dt = F.softplus(dt.to(f32) + self.dt_bias.to(f32))  # (b, T, h)
        A = -torch.exp(self.A_log.to(f32))  # (h,)
        if cache is not None and T == 1:  # decoding: one step of the recurrence
            y, state = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], cache.ssm)
            y = y[:, None]  # (b, 1, h, P)
        else:  # training, or a prefill continuing from the cached state
            y, state = ssd(x, dt, A, B, C, self.chunk_size, cache.ssm if cache is not None else None)
        if cache is not None:
            cache.ssm.copy_(state)
        y = (y + x * self.D[:, None]).to(x.dtype).reshape(b, T, self.d_inner)  # skip D; (b, T, d_inner)
        return self.dropout(self.out_proj(self.norm(y, z)))  # (b, T, C)

    def new_cache(self, batch_size, max_len, device, dtype):
        """A fixed-size cache: max_len does not matter to a recurrent layer."""
        return MambaCache(batch_size, self.conv_dim, self.d_conv, self.n_head, self.head_dim,
                          self.d_state, device, dtype)

    def flops_per_token(self, seq_len):
        """Training FLOPs per token (forward + backward = 3x forward), counting a multiply-add as 2.

        Weights: 6 per weight of in_proj, out_proj and the conv (each used once per token).
        The scan, with Q = min(chunk_size, seq_len), d_inner = h P, forward per token:
            2 Q N g          C B^T inside the chunk (one Q x Q matrix per group)
            2 Q d_inner      the decay-masked Q x Q matrix times dt x
            2 N d_inner      the chunk's own state, B^T (dt x)
            2 N d_inner      C times the state entering the chunk
            2 N d_inner / Q  the recurrence across chunks (one state update per chunk)
        As PaLM's attention term counts QK^T and AV over the full T x T, the full Q x Q blocks are
        counted. Elementwise work (decays, gates, norm) is left out, as everywhere in model.py.
        `ssd_chunked` writes the recurrence across chunks as one (c+1) x (c+1) matrix product over
        the c = seq_len / Q chunks, which does about c + 1 times the last term's work (at 8192
        tokens and Q = 128, 2 N d_inner (c+1)^2 / T instead of 2 N d_inner / Q); the count here is
        the algorithm's, as with a sequential kernel such as mamba-ssm's, not that overhead.
        """
        Q = min(self.chunk_size, seq_len)
        N, g, d = self.d_state, self.n_groups, self.d_inner
        weights = self.in_proj.weight.numel() + self.out_proj.weight.numel() + self.conv1d.weight.numel()
        scan = 2 * Q * N * g + 2 * Q * d + 4 * N * d + 2 * N * d / Q
        return 6 * weights + 3 * scan
