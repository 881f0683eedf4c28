"""PEER: a feed-forward layer made of up to a million single-neuron experts, of which each token
retrieves a few dozen through product keys, so parameters grow a thousandfold at almost no compute.

He, "Mixture of A Million Experts", arXiv 2407.04153; product keys from Lample et al., "Large
Memory Layers with Product Keys", arXiv 1907.05242.

    expert i = (u_i, v_i):  e_i(x) = act(u_i · x) v_i                       N = n^d experts
    q_h = norm(W_q^h x), split into d parts q_h^1 .. q_h^d                 one query per head h
    expert i = (i_1, .., i_d) in base n has key K(i) = concat_j K_j[i_j], so q · K(i) = sum_j q^j · K_j[i_j]
    I_h = top-k_i q_h · K(i)       found exactly from d sets of n sub-keys: top-k of each set, then
                                   the top-k of the k·k sums of two sets, set by set
    y = sum_h sum_{i in I_h} softmax_k(q_h · K(i)) e_i(x)

Exactness of the retrieval: if a full key is among the top-k, each of its parts is among the top-k
of its own set (otherwise k better parts would give k better full keys), so scoring n keys per set
and k·k pairs per step finds what brute force over all N keys finds, for n^d keys at cost d·n + (d-1)k².

Query normalisation. The paper puts BatchNorm on the queries (from product-key memories: it
spreads queries so that many keys get used). BatchNorm's training-time statistics are the mean and
variance over every position of the batch, future positions included, so token t's expert choice
would depend on tokens after t: the model would not be causal while training, and at sampling time
the running averages would differ from what training saw. Here each query part q_h^j is normalised
by itself (LayerNorm without affine: zero mean, unit variance over its own dims), which uses one
token only: causal at training time, identical at sampling time, and it keeps the score scale fixed
while the learnable keys set how sharp the softmax is.

The experts' input dots without the gather. Each token m needs a_pre[m, j] = u_{ids[m, j]} · x_m for
its J = h·k retrievals. The reference (`expert_dots_reference`, plain PyTorch, the CPU path) gathers
the rows whole, u = w_in[ids] (M, h, k, C), then dots them. With `TRITON` set (GPT_TRITON=1),
`expert_dots` runs two kernels instead (`ExpertDots`): forward, one program per (token, BLOCK_J
retrievals) reads x_m and the rows block by block over C and accumulates the dots in fp32;
backward, one program per (token, BLOCK_C columns) reads the rows again for
dL/dx_m = sum_j g[m, j] u_{ids[m, j]} and adds g[m, j] x_m into dL/dw_in[ids[m, j]] by fp32 atomic
adds (experts repeat across tokens and heads; the adds commute up to rounding, so the table's
gradient is not bitwise reproducible: the reference serves when deterministic algorithms are asked
for). Both paths dot in fp32 (the table's dtype), autocast or not. At the bench row's shape
(M = 12288 tokens, J = 128, C = 768, fp32 rows) one pass over the retrieved rows is M·J·C·4 B =
4.83 GB, and a step moves through HBM

    reference:  forward   read rows, write u, read u                            3 x 4.83 = 14.5 GB
                backward  write dL/du, read u (for dL/dx), read dL/du,
                          read and write the table's gradient rows              5 x 4.83 = 24.2 GB
    kernels:    forward   read rows                                                        4.8 GB
                backward  read rows, read and write the gradient rows (atomics) 3 x 4.83 = 14.5 GB

so 19.3 GB less, about 5.8 ms at the H100's 3.35 TB/s, and u (4.83 GB) is no longer held from
forward to backward. The kernels are checked against the reference under Triton's CPU interpreter
(fp32) and built for the H100 (sm_90a, BLOCK_J 16, BLOCK_C 256, 4 warps: 78 and 76 registers a
thread, no spills, 16-byte loads and atomic adds) by tests/test_peer.py, and on an H100 they equal
the reference, eager and compiled (2026-12-08). Like the repo's other kernels they are opt-in
(GPT_TRITON=1) until their speed is measured.

Config: ffn="peer", moe_every, peer_keys (n), peer_key_sets (d), peer_key_dim, peer_heads,
peer_topk; activation (as the MLP's).
"""

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from gpt.moe import activation

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch reference serves
    triton = None

# expert_dots' kernels: retrievals per block, columns per block, warps (see the build test for registers)
DOTS_BLOCK_J, DOTS_BLOCK_C, DOTS_WARPS = 16, 256, 4
# Triton's CPU interpreter (TRITON_INTERPRET=1, read when triton is imported) runs the kernels on CPU tensors
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The Triton kernels serve CUDA tensors only when TRITON is set (environment: GPT_TRITON=1); the
# PyTorch path serves otherwise.
TRITON = os.environ.get("GPT_TRITON") == "1"


def product_key_topk(q, keys, k):
    """Exact top-k over the Cartesian product of d key sets.

    q: (..., d, dk) query parts; keys: (d, n, dk) sub-keys. Expert i = (i_1, .., i_d) in base n
    (i = i_1 n^(d-1) + .. + i_d) scores sum_j q[j] · keys[j, i_j]. Returns (scores, ids), (..., k),
    best first.
    """
    n = keys.shape[1]
    s = torch.einsum("...jc,jnc->...jn", q, keys.to(q.dtype))  # (..., d, n)
    top_s, top_i = s[..., 0, :].topk(k, dim=-1)  # (..., k)
    for j in range(1, keys.shape[0]):
        sj, ij = s[..., j, :].topk(k, dim=-1)  # (..., k)
        cand_s = top_s.unsqueeze(-1) + sj.unsqueeze(-2)  # (..., k, k): every pair of survivors
        cand_i = top_i.unsqueeze(-1) * n + ij.unsqueeze(-2)  # (..., k, k): their expert ids
        top_s, pos = cand_s.flatten(-2).topk(k, dim=-1)  # (..., k)
        top_i = cand_i.flatten(-2).gather(-1, pos)  # (..., k)
    return top_s, top_i


def all_key_scores(q, keys):
    """Brute force: the scores of all N = n^d experts, (..., N), in id order (the test oracle)."""
    s = torch.einsum("...jc,jnc->...jn", q, keys.to(q.dtype))  # (..., d, n)
    total = s[..., 0, :]  # (..., n)
    for j in range(1, keys.shape[0]):
        total = (total.unsqueeze(-1) + s[..., j, :].unsqueeze(-2)).flatten(-2)  # (..., n^(j+1))
    return total


# ----------------------------------------------------------------------------------------------
# The experts' input dots a_pre[m, j] = w_in[ids[m, j]] · x[m], without the (M, h, k, C) gather

def expert_dots_reference(x2, ids, w_in):
    """x2 (M, C), ids (M, h, k), w_in (N, C) -> (M, h, k) in fp32 (w_in's dtype): the rows gathered
    whole, then dotted. The dot runs with autocast off, as the kernel's does."""
    u = F.embedding(ids, w_in)  # (M, h, k, C): the chosen experts' input weights
    with torch.autocast(x2.device.type, enabled=False):
        return torch.einsum("mhkc,mc->mhk", u, x2.to(u.dtype))  # (M, h, k)


if triton is not None:
    @triton.jit
    def _dots_fwd_kernel(x_ptr, ids_ptr, w_ptr, out_ptr, J: tl.constexpr, C: tl.constexpr,
                         BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program (m, jb): out[m, j] = sum_c w[ids[m, j], c] x[m, c] for the BLOCK_J retrievals j of
        block jb, accumulated in fp32 over C in blocks of BLOCK_C; the rows are read, never written."""
        m = tl.program_id(0).to(tl.int64)
        js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)  # (BLOCK_J,)
        j_ok = js < J
        rows = tl.load(ids_ptr + m * J + js, mask=j_ok, other=0)  # (BLOCK_J,) expert ids, int64
        cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        acc = tl.zeros([BLOCK_J], tl.float32)
        for start in range(0, C, BLOCK_C):
            c_ok = start + cols < C
            xb = tl.load(x_ptr + m * C + start + cols, mask=c_ok, other=0.0).to(tl.float32)  # (BLOCK_C,)
            w = tl.load(w_ptr + rows[:, None] * C + start + cols[None, :],
                        mask=j_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_J, BLOCK_C)
            acc += tl.sum(w * xb[None, :], axis=1)
        tl.store(out_ptr + m * J + js, acc, mask=j_ok)

    @triton.jit
    def _dots_bwd_kernel(x_ptr, ids_ptr, w_ptr, g_ptr, gx_ptr, gw_ptr, J: tl.constexpr, C: tl.constexpr,
                         BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr):
        """Program (m, cb), columns c of block cb: gx[m, c] = sum_j g[m, j] w[ids[m, j], c] (the rows
        read again), and gw[ids[m, j], c] += g[m, j] x[m, c] by fp32 atomic adds (many tokens may
        retrieve one expert; relaxed order: the adds commute, up to rounding)."""
        m = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        c_ok = cols < C
        xb = tl.load(x_ptr + m * C + cols, mask=c_ok, other=0.0).to(tl.float32)  # (BLOCK_C,)
        acc = tl.zeros([BLOCK_C], tl.float32)
        for start in range(0, J, BLOCK_J):
            js = start + tl.arange(0, BLOCK_J)  # (BLOCK_J,)
            j_ok = js < J
            rows = tl.load(ids_ptr + m * J + js, mask=j_ok, other=0)  # (BLOCK_J,)
            g = tl.load(g_ptr + m * J + js, mask=j_ok, other=0.0).to(tl.float32)  # (BLOCK_J,)
            offs = rows[:, None] * C + cols[None, :]  # (BLOCK_J, BLOCK_C)
            mask = j_ok[:, None] & c_ok[None, :]
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK_J, BLOCK_C)
            acc += tl.sum(g[:, None] * w, axis=0)
            tl.atomic_add(gw_ptr + offs, g[:, None] * xb[None, :], mask=mask, sem="relaxed")
        tl.store(gx_ptr + m * C + cols, acc.to(gx_ptr.dtype.element_ty), mask=c_ok)


class ExpertDots(torch.autograd.Function):
    """expert_dots_reference as two Triton kernels: x2 (M, C), ids (M, J), w_in (N, C) -> (M, J) fp32."""

    @staticmethod
    def forward(ctx, x2, ids, w_in):
        (M, C), J = x2.shape, ids.shape[1]
        out = torch.empty(M, J, device=x2.device, dtype=torch.float32)  # (M, J)
        grid = (M, (J + DOTS_BLOCK_J - 1) // DOTS_BLOCK_J)
        _dots_fwd_kernel[grid](x2, ids, w_in, out, J=J, C=C, BLOCK_J=DOTS_BLOCK_J, BLOCK_C=DOTS_BLOCK_C,
                               num_warps=DOTS_WARPS)
        ctx.save_for_backward(x2, ids, w_in)
        return out

    @staticmethod
    def backward(ctx, grad):
        x2, ids, w_in = ctx.saved_tensors
        (M, C), J = x2.shape, ids.shape[1]
        grad_x = torch.empty_like(x2)  # (M, C)
        grad_w = torch.zeros_like(w_in)  # (N, C) fp32: the atomic adds land here
        grid = (M, (C + DOTS_BLOCK_C - 1) // DOTS_BLOCK_C)
        _dots_bwd_kernel[grid](x2, ids, w_in, grad.contiguous(), grad_x, grad_w, J=J, C=C,
                               BLOCK_J=DOTS_BLOCK_J, BLOCK_C=DOTS_BLOCK_C, num_warps=DOTS_WARPS)
        return grad_x, None, grad_w


def _kernel_applies(x2, w_in):
    """The kernels serve CUDA tensors (CPU ones under the interpreter), an fp32 table and x in fp32,
    bf16 or fp16; not when deterministic algorithms are asked for (atomics sum the table's gradient)."""
    return (triton is not None and ((TRITON and x2.is_cuda) or _INTERPRET) and w_in.dtype == torch.float32
            and x2.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not torch.are_deterministic_algorithms_enabled())


def expert_dots(x2, ids, w_in):
    """a_pre[m, h, k] = w_in[ids[m, h, k]] · x2[m] in fp32: x2 (M, C), ids (M, h, k), w_in (N, C)."""
    if not _kernel_applies(x2, w_in):
        return expert_dots_reference(x2, ids, w_in)
    M, h, k = ids.shape
    return ExpertDots.apply(x2.contiguous(), ids.reshape(M, h * k).contiguous(), w_in.contiguous()).view(M, h, k)


# ----------------------------------------------------------------------------------------------
# The layer

class PEER(nn.Module):
    """forward(x (B, T, C)) -> (B, T, C), in place of the MLP. Usable alone: y = x + peer(x)."""

    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.n, self.d = config.peer_keys, config.peer_key_sets
        self.dk, self.heads, self.k = config.peer_key_dim, config.peer_heads, config.peer_topk
        self.n_expert = self.n ** self.d
        self.activation = config.activation
        self.query = nn.Linear(C, self.heads * self.d * self.dk, bias=False)  # one query per head
        # sub-keys ~ N(0, 1/dk): with unit-variance query parts each partial score is ~ N(0, 1)
        self.keys = nn.Parameter(torch.randn(self.d, self.n, self.dk) / math.sqrt(self.dk))  # (d, n, dk)
        # the experts, stored as two tables; row i is expert i (u_i in, v_i out); init as the MLP's
        self.w_in = nn.Parameter(torch.randn(self.n_expert, C) * 0.02)  # (N, C)
        self.w_out = nn.Parameter(torch.randn(self.n_expert, C) * (0.02 / math.sqrt(2 * config.n_layer)))
        self.dropout = nn.Dropout(config.dropout)

    def retrieve(self, x2):
        """x2: (M, C) -> gate weights (M, h, k) fp32 and expert ids (M, h, k)."""
        q = self.query(x2).view(-1, self.heads, self.d, self.dk).float()  # (M, h, d, dk)
        q = F.layer_norm(q, (self.dk,))  # per token, per head, per part: causal (see docstring)
        with torch.autocast(x2.device.type, enabled=False):
            scores, ids = product_key_topk(q, self.keys, self.k)  # (M, h, k)
        return scores.softmax(dim=-1), ids

    def forward(self, x):
        B, T, C = x.shape
        x2 = x.reshape(B * T, C)  # (M, C)
        g, ids = self.retrieve(x2)  # (M, h, k)
        a = activation(expert_dots(x2, ids, self.w_in), self.activation)  # (M, h, k), fp32
        w = (g * a).view(B * T, self.heads * self.k).to(self.w_out.dtype)  # (M, h*k)
        # sum_i w_i v_i without materialising the (M, h*k, C) gather of the output weights
        y = F.embedding_bag(ids.view(B * T, -1), self.w_out, per_sample_weights=w, mode="sum")  # (M, C)
        return self.dropout(y.view(B, T, C).to(x.dtype))

    def forward_reference(self, x):
        """The same output with every step spelled out (the oracle for forward's embedding_bag)."""
        B, T, C = x.shape
        x2 = x.reshape(B * T, C)
        g, ids = self.retrieve(x2)  # (M, h, k)
        u, v = self.w_in[ids], self.w_out[ids]  # (M, h, k, C) each
        a = activation((u * x2[:, None, None, :]).sum(-1), self.activation)  # (M, h, k)
        y = ((g * a).unsqueeze(-1) * v).sum(dim=(1, 2))  # (M, C)
        return y.view(B, T, C).to(x.dtype)

    def active_params(self):
        """Query projection and sub-keys (all scored for every token), plus h·k experts of 2C."""
        return self.query.weight.numel() + self.keys.numel() + self.heads * self.k * 2 * self.w_in.shape[1]

    def flops_per_token(self, seq_len):
        """6 per multiply-add of: the query projection, each head scoring d·n sub-keys, and the
        h·k experts (u_i · x and the weighted sum of v_i)."""
        C = self.w_in.shape[1]
        return 6 * (self.query.weight.numel() + self.heads * self.keys.numel() + self.heads * self.k * 2 * C)
