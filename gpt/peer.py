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

Config: ffn="peer", moe_every, peer_keys (n), peer_key_sets (d), peer_key_dim, peer_heads,
peer_topk; activation (as the MLP's).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt.moe import activation


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
        u = F.embedding(ids, self.w_in)  # (M, h, k, C): the chosen experts' input weights
        a = activation(torch.einsum("mhkc,mc->mhk", u, x2.to(u.dtype)), self.activation)  # (M, h, k)
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
