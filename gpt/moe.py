"""Mixture of experts: each token is sent to a few of many small feed-forward experts, chosen by a
router, so the parameter count grows with the number of experts while the compute per token stays
that of the few it uses. The same router picks attention heads in the mixture of attention heads.

Dai et al., "DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts Language
Models", arXiv 2401.06066 (fine-grained routed experts plus always-on shared experts);
DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv 2412.19437 (sigmoid scores, balancing without an
auxiliary loss); Fedus et al., "Switch Transformers", arXiv 2101.03961 (the auxiliary loss);
Zhang et al., "Mixture of Attention Heads", arXiv 2210.05144, and Shen et al., "JetMoE",
arXiv 2404.07413 (routed query/output projections over one shared key/value projection).

    s_i   = sigmoid(x · r_i)   (or softmax_i(x · r))        affinity of token x to expert i
    S     = top-k_i (s_i + b_i)                             b: balancing bias, used ONLY to choose
    g_i   = s_i / sum_{j in S} s_j        for i in S        gate weights from the unbiased scores
    y     = sum_{i in shared} E_i(x) + sum_{i in S} g_i E_i(x),     E_i(x) = W2_i act(W1_i x)
    after each optimizer step:  b_i <- b_i + γ sign(mean_j load_j - load_i)       (γ = bias_update_rate)
    Switch loss (optional):     L_aux = α E sum_i f_i P_i,  f_i = share of the N·k assignments that
                                went to i, P_i = mean over tokens of the normalised score of i

No token is ever dropped (dropless): every token gets its k experts whatever the load. Dispatch sorts
the (token, slot) pairs by expert (a counting sort, the counts being known) so that each expert's
tokens are one contiguous block; on a CUDA GPU in bf16 the blocks go through one grouped GEMM
(`torch._grouped_mm`, offsets = cumulative counts, int32), elsewhere through a plain loop over
experts, the reference path (it reads the counts on the host, so it syncs). Tokens routed to each
expert are counted in `stats["expert_counts"]` (logged to log.jsonl) and drawn as a layer × expert
heat map by `save_usage_heatmaps`.

Mixture of attention heads (`MoA`): E attention experts, each a group of query heads with its own
query and output projections; one key/value projection is shared by all, so the KV cache is that of
one expert. Each token picks k experts with the same `Router`; its output is the gate-weighted sum
of its experts' outputs.
Config: ffn="moe", moe_every, n_expert, n_expert_active, n_shared_expert, moe_hidden, moe_score,
bias_update_rate, moe_aux_coef; attn_experts, attn_experts_active (MoA).
"""

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from gpt.attention import KVCache, attend
from gpt.rope import Rotary


def activation(h, name):
    """config.activation, as model.py's MLP applies it (which this module cannot import: model.py
    imports it), for the experts here and in peer.py."""
    if name == "gelu":
        return F.gelu(h)
    if name == "relu2":
        return F.relu(h).square()
    raise ValueError(f"activation {name!r} has no expert version in moe.py")


# ------------------------------------------------------------------------------------------------
# The router, shared by MoE and MoA

class Router(nn.Module):
    """Scores n_expert experts for each token and picks k; balances them with a bias (DeepSeek-V3)
    and/or the Switch auxiliary loss. After a forward it holds `aux_loss` (a scalar or None) and
    `stats` ({"expert_counts": (E,)}); `after_step()` moves the bias toward balance."""

    def __init__(self, dim, n_expert, k, score="sigmoid", bias_update_rate=1e-3, aux_coef=0.0):
        super().__init__()
        self.n_expert, self.k, self.score = n_expert, k, score
        self.bias_update_rate, self.aux_coef = bias_update_rate, aux_coef
        self.gate = nn.Linear(dim, n_expert, bias=False)
        # the balancing bias is state, not a parameter: saved with the model, never trained
        self.register_buffer("expert_bias", torch.zeros(n_expert))
        # assignments per expert since the last after_step (training forwards only)
        self.register_buffer("load", torch.zeros(n_expert), persistent=False)
        self.aux_loss, self.stats = None, {}

    def scores(self, x):
        """x: (N, C) -> affinities (N, E) in fp32 (routing decisions are precision-sensitive)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())  # (N, E)
        return logits.sigmoid() if self.score == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x):
        """x: (N, C) -> expert ids (N, k), gate weights (N, k) (fp32, summing to 1 per token) and
        tokens per expert (E,)."""
        s = self.scores(x)  # (N, E)
        idx = (s + self.expert_bias).topk(self.k, dim=-1).indices  # (N, k): the bias only chooses
        chosen = s.gather(-1, idx)  # (N, k): unbiased scores of the chosen experts
        gates = chosen / chosen.sum(dim=-1, keepdim=True).clamp_min(1e-20)  # (N, k)
        counts = count_experts(idx, self.n_expert)  # (E,)
        self.stats = {"expert_counts": counts}
        self.aux_loss = None
        if self.training:
            with torch.no_grad():
                self.load += counts
            if self.aux_coef > 0:
                f = counts.float() / idx.numel()  # (E,): share of the assignments
                P = (s / s.sum(dim=-1, keepdim=True)).mean(dim=0)  # (E,): mean normalised score
                self.aux_loss = self.aux_coef * self.n_expert * (f * P).sum()
        return idx, gates, counts

    @torch.no_grad()
    def after_step(self):
        """b_i += γ sign(mean load - load_i): raise the bias of underloaded experts, lower it for
        overloaded ones (DeepSeek-V3 §2.1.2). With data parallelism the load would be all-reduced.
        No test of the load on the host (a sync each step): with no load since the last step every
        sign is 0, and the bias stays."""
        if self.bias_update_rate > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()


# ------------------------------------------------------------------------------------------------
# Dispatch: (token, slot) pairs sorted by expert, one matmul per expert block

def count_experts(idx, n_expert):
    """How many of the (token, slot) pairs of idx chose each expert: (E,) int64. (A scatter-add,
    not bincount, whose output size depends on the data and would break torch.compile's graph.)"""
    flat = idx.flatten()
    return flat.new_zeros(n_expert).scatter_add_(0, flat, torch.ones_like(flat))


def compute_dtype(x):
    """The dtype matmuls on x run in: autocast's when it is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def counting_sort(keys, counts):
    """The stable argsort of keys (M,) in [0, E), whose counts (E,) are known: a pair's place is the
    start of its expert's block plus how many earlier pairs chose the same expert. A few fused
    elementwise passes and one scan instead of a radix sort. -> order (M,): keys[order] is sorted."""
    E = counts.shape[0]
    start = counts.cumsum(0) - counts  # (E,): first sorted place of each expert's block
    seen = F.one_hot(keys, E).cumsum(0)  # (M, E): pairs so far that chose each expert, this one included
    dest = start[keys] + seen.gather(1, keys[:, None]).squeeze(1) - 1  # (M,): where each pair lands
    return torch.empty_like(keys).scatter_(0, dest, torch.arange(keys.shape[0], device=keys.device))


class Dispatch:
    """Sorts the N·k (token, slot) pairs of idx (N, k) by expert; counts (E,) are the Router's.
    `gather` lines up the rows each pair needs, `scatter` puts per-pair results back in (token,
    slot) order: (N, k, d)."""

    def __init__(self, idx, counts):
        self.N, self.k = idx.shape
        self.order = counting_sort(idx.flatten(), counts)  # (N*k,): pair p = (token p // k, slot p % k)
        self.token = self.order // self.k  # (N*k,): the token of each sorted pair
        self.counts = counts  # (E,): pairs per expert, the lengths of the sorted blocks

    def gather(self, x):
        """x: (N, d) per token, or (N*k, d) per pair in (token, slot) order -> (N*k, d) sorted."""
        return x[self.token] if x.shape[0] == self.N else x[self.order]

    def scatter(self, ys):
        """ys: (N*k, d) sorted by expert -> (N, k, d) in (token, slot) order."""
        return torch.empty_like(ys).index_copy_(0, self.order, ys).view(self.N, self.k, -1)


# How expert_matmul hands the experts' weights (E, d_in, d_out) to the grouped GEMM: "kn" as stored
# (d_out contiguous), or "nk", written transposed by the bf16 cast (d_in contiguous: the layout that
# nn.Linear's (out, in) weights give, and the one PyTorch's grouped_mm documentation shows for MoE).
# bench.py's rows gpt2-moe-8-graph and gpt2-moe-8-nk-graph time the two (bench/RESULTS.md).
GROUPED_LAYOUT = "kn"


def grouped_mm_ok(x, w):
    """Whether `torch._grouped_mm` can take x (M, d_in) and w (E, d_in, d_out): CUDA, bf16 (or bf16
    autocast), and rows of 16-byte multiples (8 bf16 values), as its kernel requires."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    return compute_dtype(x) == torch.bfloat16 and w.shape[1] % 8 == 0 and w.shape[2] % 8 == 0


def expert_matmul(xs, w, counts, grouped=None):
    """xs: (M, d_in), rows sorted by expert, counts[e] rows for expert e; w: (E, d_in, d_out).
    Row r of the result is xs[r] @ w[expert of r]: (M, d_out).

    grouped=None picks the grouped GEMM when `grouped_mm_ok`, else the loop (the reference)."""
    if grouped is None:
        grouped = grouped_mm_ok(xs, w)
    if grouped:
        offs = counts.cumsum(0).to(torch.int32)  # (E,): end row of each expert's block
        wb = w.to(torch.bfloat16)  # (E, d_in, d_out)
        if GROUPED_LAYOUT == "nk":  # the same (E, d_in, d_out), d_in contiguous: one more copy of the weights
            wb = wb.mT.contiguous().mT
        return torch._grouped_mm(xs.to(torch.bfloat16), wb, offs=offs)
    blocks = torch.split(xs, counts.tolist())  # host sync: the reference path
    return torch.cat([b @ w[e].to(b.dtype) for e, b in enumerate(blocks)])  # (M, d_out)


# ------------------------------------------------------------------------------------------------
# DeepSeekMoE feed-forward

class MoE(nn.Module):
    """Routed experts (n_expert, top n_expert_active) plus shared experts, dropless, in place of the
    MLP: forward(x (B, T, C)) -> (B, T, C)."""

    def __init__(self, config):
        super().__init__()
        C, H = config.n_embd, config.expert_hidden
        E, k, n_shared = config.n_expert, config.n_expert_active, config.n_shared_expert
        self.n_expert, self.k, self.hidden = E, k, H
        self.activation = config.activation
        self.router = Router(C, E, k, config.moe_score, config.bias_update_rate, config.moe_aux_coef)
        # routed experts stacked for the grouped GEMM: expert e is w2[e] act(w1[e] x)
        self.w1 = nn.Parameter(torch.randn(E, C, H) * 0.02)  # (E, C, H)
        self.w2 = nn.Parameter(torch.randn(E, H, C) * (0.02 / math.sqrt(2 * config.n_layer)))  # (E, H, C)
        # the shared experts, always on, computed together as one MLP of n_shared * H hidden units
        self.shared = None
        if n_shared:
            self.shared = nn.Sequential(nn.Linear(C, n_shared * H, bias=config.bias),
                                        nn.Linear(n_shared * H, C, bias=config.bias))
            self.shared[1].residual = True  # scaled init (model.py)
        self.dropout = nn.Dropout(config.dropout)
        self.grouped = None  # None: grouped GEMM when possible; True/False forces a path (tests)

    def forward(self, x):
        B, T, C = x.shape
        x2 = x.reshape(B * T, C)  # (N, C)
        idx, gates, counts = self.router(x2)  # (N, k), (N, k), (E,)
        d = Dispatch(idx, counts)
        xs = d.gather(x2.to(compute_dtype(x2)))  # (N*k, C) sorted by expert (cast first: half the bytes)
        h = activation(expert_matmul(xs, self.w1, d.counts, self.grouped), self.activation)  # (N*k, H)
        ys = expert_matmul(h, self.w2, d.counts, self.grouped)  # (N*k, C)
        y = (d.scatter(ys) * gates.unsqueeze(-1).to(ys.dtype)).sum(dim=1)  # (N, C)
        if self.shared is not None:
            s = self.shared[1](activation(self.shared[0](x2), self.activation))  # (N, C)
            y = y + s
        return self.dropout(y.view(B, T, C).to(x.dtype))

    def active_params(self):
        """Router, the k chosen experts and the shared ones: what one token uses."""
        shared = sum(p.numel() for p in self.shared.parameters()) if self.shared is not None else 0
        return self.router.gate.weight.numel() + self.k * (self.w1[0].numel() + self.w2[0].numel()) + shared

    def flops_per_token(self, seq_len):
        return 6 * self.active_params()


# ------------------------------------------------------------------------------------------------
# Mixture of attention heads

class MoA(nn.Module):
    """Causal self-attention whose query and output projections are routed experts (MoA, JetMoE).

    Expert e has hpe = n_head / attn_experts_active query heads (Wq[e]: C -> hpe·hs) and an output
    projection (Wo[e]: hpe·hs -> C). Keys and values come from one shared projection with hpe heads;
    query head i of every chosen expert reads key/value head i. A token with k chosen experts thus
    has k·hpe = n_head query heads, the compute of dense attention, and the KV cache holds hpe heads.
    Same mixer interface as CausalSelfAttention: forward(x, pos, cache=None), new_cache(...).
    """

    def __init__(self, config):
        super().__init__()
        C, hs = config.n_embd, config.head_dim
        E, k = config.attn_experts, config.attn_experts_active
        self.n_expert, self.k, self.head_dim = E, k, hs
        self.hpe = config.n_head // k  # query heads per expert = key/value heads
        self.router = Router(C, E, k, config.moe_score, config.bias_update_rate, config.moe_aux_coef)
        self.c_kv = nn.Linear(C, 2 * self.hpe * hs, bias=config.bias)  # shared keys and values
        self.wq = nn.Parameter(torch.randn(E, C, self.hpe * hs) * 0.02)  # (E, C, hpe*hs)
        self.wo = nn.Parameter(torch.randn(E, self.hpe * hs, C) * (0.02 / math.sqrt(2 * config.n_layer)))
        self.rotary = (Rotary(config.rotary_dims, config.rope_base, config.block_size)
                       if config.pos == "rope" else None)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        self.grouped = None

    def forward(self, x, pos, cache=None):
        """x: (B, T, C); pos: (T,) absolute positions, or (B, T) for the tokens a MoD block routed;
        cache: a KVCache, a RoutedCache (mod.py) or None."""
        B, T, C = x.shape
        k, hpe, hs = self.k, self.hpe, self.head_dim
        x2 = x.reshape(B * T, C)  # (N, C)
        idx, gates, counts = self.router(x2)  # (N, k), (N, k), (E,)
        d = Dispatch(idx, counts)
        xs = d.gather(x2.to(compute_dtype(x2)))  # (N*k, C) sorted by expert
        qs = expert_matmul(xs, self.wq, d.counts, self.grouped)  # (N*k, hpe*hs)
        q = d.scatter(qs).view(B, T, k, hpe, hs)  # (B, T, k, hpe, hs)
        q = q.permute(0, 3, 2, 1, 4).reshape(B, hpe * k, T, hs)  # (B, hpe*k, T, hs): head i*k + j
        kv = self.c_kv(x).view(B, T, 2, hpe, hs)
        kk, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # (B, hpe, T, hs) each
        if self.rotary is not None:
            q, kk = self.rotary(q, pos), self.rotary(kk, pos)
        q = q.to(v.dtype)
        # query head i*k + j reads key/value head (i*k + j) // k = i, as attend()'s GQA maps them
        k_pos = None
        if cache is not None:
            kk, v, k_pos = cache.update(kk, v, pos)  # (B, hpe, S, hs), (S,) or (B, S) (MoD) or None
        if k_pos is None:
            y = attend(q, kk, v, dropout=self.dropout if self.training else 0.0)  # (B, hpe*k, T, hs)
        else:
            y = attend(q, kk, v, q_pos=pos, k_pos=k_pos)
        y = y.view(B, hpe, k, T, hs).permute(0, 3, 2, 1, 4).reshape(B * T * k, hpe * hs)  # (N*k, hpe*hs)
        ys = expert_matmul(d.gather(y), self.wo, d.counts, self.grouped)  # (N*k, C) sorted
        out = (d.scatter(ys) * gates.unsqueeze(-1).to(ys.dtype)).sum(dim=1)  # (N, C)
        return self.resid_dropout(out.view(B, T, C).to(x.dtype))

    def new_cache(self, batch_size, max_len, device, dtype):
        return KVCache(batch_size, max_len, self.hpe, self.head_dim, device, dtype)

    def active_params(self):
        return (self.router.gate.weight.numel() + self.c_kv.weight.numel()
                + self.k * (self.wq[0].numel() + self.wo[0].numel()))

    def flops_per_token(self, seq_len):
        """6 per active weight, plus the attention term of k·hpe query heads (as attention.py)."""
        return 6 * self.active_params() + 12 * self.k * self.hpe * self.head_dim * seq_len


# ------------------------------------------------------------------------------------------------
# Expert usage: the layer × expert heat map

def save_usage_heatmaps(records, out_dir):
    """From log.jsonl records, draw each routed kind's expert load (layer × expert, as a multiple of
    the mean load: 1 everywhere is perfect balance) summed over the train records logged since the
    previous evaluation. Writes experts_ffn.png (MoE) and/or experts_mixer.png (MoA) in out_dir;
    returns the paths written (none when the model has no router)."""
    from gpt import plot

    evals = [r["step"] for r in records if r.get("kind") == "eval"]
    since = evals[-2] if len(evals) >= 2 else -1
    window = [r for r in records if r.get("kind") == "train" and r["step"] > since]
    paths = []
    for kind in ("ffn", "mixer"):
        suffix = f".{kind}.router.expert_counts"
        keys = sorted({k for r in window for k in r if k.endswith(suffix)},
                      key=lambda k: int(k.split(".")[1]))  # blocks.<layer>.<kind>.router...
        if not keys:
            continue
        rows = torch.tensor([[sum(c) for c in zip(*[r[k] for r in window if k in r])] for k in keys],
                            dtype=torch.float64)  # (layers, E)
        rows = rows / rows.mean(dim=1, keepdim=True).clamp_min(1e-12)
        layers = ", ".join(k.split(".")[1] for k in keys)
        path = os.path.join(out_dir, f"experts_{kind}.png")
        plot.heatmap(rows.numpy(), path, title=f"{kind} expert load / mean load, steps {since + 1}-"
                     f"{window[-1]['step']} (1 = balanced)", xlabel="expert",
                     ylabel=f"MoE layer ({layers})")
        paths.append(path)
    return paths
