"""Mixture-of-Depths: a router scores every token, and only the top capacity·T tokens of a sequence
go through a routed block (attention and MLP); the others skip it along the residual stream.
Compute per token drops to about `capacity` of the block's, and the router learns which tokens need it.

Raposo et al., "Mixture-of-Depths: Dynamically allocating compute in transformer-based language
models", arXiv 2404.02258.

    r_i = w · x_i + b                         router score of token i (b starts at 1, w ~ N(0, 0.02))
    K   = top-k_i(r_i, k = capacity · T)       the routed tokens: training, over the whole sequence
    x_i' = x_i + r_i · f(x_i)   if i in K      f(x) = block(x) - x: attention then MLP, on K only
    x_i' = x_i                  otherwise      the residual is added once, for routed tokens only

Routed tokens keep their original positions (RoPE rotates by them) and attend only to routed tokens
at earlier positions. Multiplying f by r_i is what trains the router: the LM loss reaches w only
through that product. (The paper multiplies by r itself; with b = 1 a routed block starts out as the
dense block on its tokens.) So r is computed twice: over all T tokens without gradient, to choose,
and again on the k chosen ones for that product, so that backward touches k rows instead of T.

The causality trap. Top-k over the sequence compares token i's score with those of later tokens, so
whether token i is routed depends on the future: fine for training, impossible when sampling one
token at a time (a model sampled that way sees different routing than it was trained on, and writes
nonsense). The paper gives two fixes; this file uses the *auxiliary predictor*:

    p_i = MLP(rmsnorm(stopgrad(x_i)))          a small 2-layer MLP on the router's input, normalised
    L_aux = BCE(p_i, [i in K])                 trained to predict top-k membership
    inference (model.eval(), or with a cache):  i is routed iff p_i > 0      causal: token i only

Why the predictor and not the auxiliary loss on the router itself: the stop-gradient keeps the
predictor's loss away from the router and the rest of the model, so the LM objective is exactly
the one of top-k routing (the paper reports no degradation), and the predictor's accuracy is a
number we can log and test (`stats["predictor_acc"]`); the router's own aux loss would instead pull
r toward a fixed threshold and mix a classification objective into the LM gradient.

At inference the number of routed tokens varies per row; rows are packed to the front of a
(B, k_max) batch and padded with unrouted tokens whose outputs are thrown away. With a cache,
`RoutedCache` keeps only the routed tokens of that layer, each with its position.

Which blocks can be routed (checked in config.py): attention layers G and L with multi-head,
GQA, MQA or latent attention (MLA), and G layers with the mixture of attention heads (MoA): each
takes its keys' positions from the cache's update(), (B, S) here. Not Mamba (M: padding tokens would
advance its state), not kv_share > 1 (a shared cache would hold a different token subset per
layer). In an L layer the window counts positions, not routed tokens, so its routed attention
always builds the mask from positions (`RoutedPositions`; no flash kernel, no attention dropout).

FLOPs: a routed block costs capacity × its FLOPs at sequence length capacity·T, plus the router and
the predictor. Config: mod_every (route blocks mod_every-1, 2·mod_every-1, ...; 0 = off),
mod_capacity, mod_predictor_hidden.
"""

import torch
import torch.nn.functional as F
from torch import nn

HIDDEN = 2 ** 62  # the position of a padding key or an empty cache slot: after every query, never seen


class RoutedCache:
    """A routed layer's cache: the keys and values of its routed tokens only, packed per row, with
    each token's position (a sliding-window layer keeps them all too: no ring buffer).
    k: (B, hk, max_len, dk), v: (B, hv, max_len, dv), pos: (B, max_len), length: (B,).
    Same update() protocol as attention.py's caches; `valid` (B, T), set by MoD before each call,
    marks which of the new tokens are real (the rest are padding: never stored)."""

    def __init__(self, like, batch_size, max_len):
        k, v = like.k, like.v  # the mixer's own cache, of max_len 1: only its shapes are used
        self.k = k.new_zeros(batch_size, k.shape[1], max_len, k.shape[3])
        self.v = v.new_zeros(batch_size, v.shape[1], max_len, v.shape[3])
        self.pos = torch.full((batch_size, max_len), HIDDEN, dtype=torch.long, device=k.device)
        self.length = torch.zeros(batch_size, dtype=torch.long, device=k.device)
        self.valid = None

    def update(self, k, v, pos):
        """k, v: (B, h, T, d) of the new routed tokens at pos (B, T). Returns every stored key and
        value (B, h, S, d) and their positions (B, S), S = the longest row; HIDDEN in empty slots."""
        valid = self.valid if self.valid is not None else torch.ones_like(pos, dtype=torch.bool)
        end = self.length + valid.sum(1)  # (B,)
        if int(end.max()) > self.k.shape[2]:
            raise ValueError(f"routed cache full: {int(end.max())} tokens > max_len {self.k.shape[2]}")
        slot = self.length[:, None] + valid.cumsum(1) - 1  # (B, T): where each real token goes
        b, t = valid.nonzero(as_tuple=True)
        self.k[b, :, slot[b, t]] = k[b, :, t]
        self.v[b, :, slot[b, t]] = v[b, :, t]
        self.pos[b, slot[b, t]] = pos[b, t]
        self.length = end
        S = int(end.max())
        return self.k[:, :, :S], self.v[:, :, :S], self.pos[:, :S]

    def nbytes(self):
        return self.k.nbytes + self.v.nbytes + self.pos.nbytes


class RoutedPositions:
    """No cache (training, a forward in eval mode), in a sliding-window layer: hands the new keys
    straight back with their positions, padding HIDDEN, so that attend() applies the window to
    positions rather than to the order of the routed tokens."""

    def __init__(self, valid):
        self.valid = valid  # (B, T) or None (no padding)

    def update(self, k, v, pos):
        return k, v, pos if self.valid is None else pos.masked_fill(~self.valid, HIDDEN)


# ------------------------------------------------------------------------------------------------
# The routed block

def capacity_tokens(capacity, T):
    """k: how many of T tokens a routed block takes in training."""
    return max(1, round(capacity * T))


def pack(routed):
    """routed: (B, T) bool -> idx (B, k_max): each row's routed token indices in order, then its
    other indices (padding); valid (B, k_max): True for the routed ones."""
    B, T = routed.shape
    ar = torch.arange(T, device=routed.device)
    order = torch.argsort((~routed) * T + ar, dim=1)  # (B, T): routed first, each part in order
    counts = routed.sum(1)  # (B,)
    k = int(counts.max())
    return order[:, :k], ar[:k] < counts[:, None]  # (B, k), (B, k)


class MoD(nn.Module):
    """Wraps one Block: forward(x, pos, cache=None) runs the block on the routed tokens only.
    Routing: top-k of the router in training (no cache), the predictor's threshold otherwise.
    After a forward: `aux_loss` (the predictor's BCE, training only) and `stats` {"routed": fraction
    of tokens through the block, "predictor_acc": agreement of predictor and top-k (no cache)}."""

    def __init__(self, block, config):
        super().__init__()
        C, H = config.n_embd, config.mod_predictor_hidden
        self.block = block
        self.capacity = config.mod_capacity
        # router parameters stay out of nn.Linear so that GPT's init (normal, zero bias) leaves them be
        self.router_w = nn.Parameter(torch.randn(C) * 0.02)  # (C,)
        self.router_b = nn.Parameter(torch.ones(()))  # r starts at ~1: the routed block at full weight
        self.predictor = nn.Sequential(nn.Linear(C, H), nn.GELU(), nn.Linear(H, 1))
        self.window = getattr(block.mixer, "window", None)
        self.aux_loss, self.stats = None, {}

    def router(self, x):
        """x: (..., C) -> router scores r (...), fp32 (routing decisions are precision-sensitive)."""
        with torch.autocast(x.device.type, enabled=False):
            return x.float() @ self.router_w.float() + self.router_b.float()

    def scores(self, x):
        """x: (B, T, C) -> router scores r (B, T), without gradient (they only choose the tokens;
        forward recomputes r on the chosen ones for the product that trains the router), and
        predictor logits (B, T)."""
        C = x.shape[-1]
        with torch.no_grad():
            r = self.router(x)  # (B, T)
        with torch.autocast(x.device.type, enabled=False):
            h = F.rms_norm(x.detach().float(), (C,))  # stop-gradient; the stream's scale drifts, so normalise
            p = self.predictor(h.type_as(self.router_w)).float().squeeze(-1)  # (B, T); a bf16 model: bf16
        return r, p

    def forward(self, x, pos, cache=None):
        """x: (B, T, C); pos: (T,) absolute positions; cache: a RoutedCache or None."""
        B, T, C = x.shape
        r, p = self.scores(x)  # (B, T), (B, T)
        pos = pos.expand(B, T)  # (B, T)
        self.aux_loss, stats = None, {}
        if cache is None:  # the top-k choice, the training target of the predictor
            top = r.topk(capacity_tokens(self.capacity, T), dim=1, sorted=False).indices  # (B, k), any order
            in_top = torch.zeros_like(r, dtype=torch.bool).scatter(1, top, True)  # (B, T)
            stats["predictor_acc"] = ((p > 0) == in_top).float().mean().detach()
        if self.training and cache is None:
            idx, valid = top.sort(dim=1).values, None  # (B, k): in order, all real
            self.aux_loss = F.binary_cross_entropy_with_logits(p, in_top.float())
            stats["routed"] = torch.tensor(idx.shape[1] / T)
        else:  # causal: each token's own prediction
            routed = p > 0  # (B, T)
            stats["routed"] = routed.float().mean()
            idx, valid = pack(routed)  # (B, k_max), (B, k_max)
            if valid.all():
                valid = None
        self.stats = stats
        if idx.shape[1] == 0:  # nothing routed anywhere in the batch
            return x
        gather = idx.unsqueeze(-1).expand(-1, -1, C)  # (B, k, C)
        xs = x.gather(1, gather)  # (B, k, C)
        if cache is not None:
            cache.valid = valid
        elif self.window is not None:
            cache = RoutedPositions(valid)
        ys = self.block(xs, pos.gather(1, idx), cache)  # (B, k, C): xs + f(xs)
        rs = self.router(xs)  # (B, k): r again, on the routed tokens only, so backward touches only them
        out = xs + rs.unsqueeze(-1).to(ys.dtype) * (ys - xs)  # (B, k, C)
        if valid is not None:  # padding: its outputs are dropped, x stays
            out = torch.where(valid.unsqueeze(-1), out, xs)
        return x.scatter(1, gather, out.to(x.dtype))  # (B, T, C)

    def new_cache(self, batch_size, max_len, device, dtype):
        return RoutedCache(self.block.mixer.new_cache(batch_size, 1, device, dtype), batch_size, max_len)

    def flops_per_token(self, seq_len):
        """capacity × the block's FLOPs over the capacity·seq_len routed tokens, plus router and
        predictor (6 per weight)."""
        k = capacity_tokens(self.capacity, seq_len)
        predictor = sum(m.weight.numel() for m in self.predictor if isinstance(m, nn.Linear))
        return (k / seq_len) * self.block.flops_per_token(k) + 6 * (self.router_w.numel() + predictor)
