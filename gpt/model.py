"""The GPT: token embedding, a stack of pre-norm residual blocks, a final norm and the output head.

Radford et al., "Language Models are Unsupervised Multitask Learners" (GPT-2), 2019; the code
follows nanoGPT's model.py.

    h_0 = E[idx] (+ P[pos] for learned positions)
    h_l = h_{l-1} + mixer_l(norm(h_{l-1}));  h_l = h_l + ffn_l(norm(h_l))       l = 1 .. n_layer
    logits = norm(h_L) E^T                                                      (tied head)

Each layer's mixer comes from its letter in `config.layers` (G: global causal attention, L: local
sliding-window attention, both MHA/GQA or, with config.attn="mla", multi-head latent attention) and
its feed-forward from `config.ffn`; every mod_every-th block is wrapped by mixture-of-depths
(mod.py: only the top tokens go through it). The seams every concept plugs into (see shared/DESIGN.md):
  - mixers share one interface: forward(x, pos, cache=None) and new_cache(...); the layers of a
    KV-sharing group (config.kv_share) are handed one cache object (or, without a cache, one
    attention.SharedKV per forward) through which the group's first layer passes its keys/values;
  - layers with auxiliary losses or statistics expose `aux_loss` / `stats` after a forward,
    gathered by `GPT.aux_loss()` / `GPT.stats()`; `GPT.after_step()` runs their post-step updates;
  - each layer reports `flops_per_token(T)` (and `active_params()` when not all its weights are
    used for every token); `GPT` sums them for MFU and the benchmark.
Config: every field of GPTConfig in gpt/config.py.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpt import bitnet
from gpt.attention import CausalSelfAttention, kv_owners, link_caches, shared_kv_slots
from gpt.config import GPTConfig
from gpt.linear_attention import LinearAttention
from gpt.loss import cross_entropy, linear_cross_entropy
from gpt.mamba import Mamba2
from gpt.mla import MultiHeadLatentAttention
from gpt.mod import MoD
from gpt.moe import MoA, MoE
from gpt.peer import PEER


class RMSNorm(nn.Module):
    """x / rms(x) * g (Zhang & Sennrich, arXiv 1910.07467)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(config, dim=None):
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(dim)
    return nn.LayerNorm(dim, bias=config.bias)


class MLP(nn.Module):
    """Position-wise feed-forward: W_2 act(W_1 x), hidden width mlp_ratio * n_embd."""

    def __init__(self, config):
        super().__init__()
        hidden = int(config.mlp_ratio * config.n_embd)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.c_proj.residual = True  # scaled init
        self.activation = config.activation
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, 4C)
        h = F.gelu(h) if self.activation == "gelu" else F.relu(h).square()
        return self.dropout(self.c_proj(h))  # (B, T, C)

    def flops_per_token(self, seq_len):
        return 6 * (self.c_fc.weight.numel() + self.c_proj.weight.numel())


def make_mixer(config, letter, layer_idx):
    """The module for one layer-pattern letter (see LAYER_LETTERS in config.py)."""
    if letter == "G" and config.attn_experts:  # mixture of attention heads (moe.py)
        return MoA(config)
    if letter in ("G", "L"):  # attention, global or sliding-window, KV sharing; config.attn picks
        window = config.window if letter == "L" else None  # multi-head (GQA/MQA) or latent (mla.py)
        attention = MultiHeadLatentAttention if config.attn == "mla" else CausalSelfAttention
        return attention(config, window, reads_kv=kv_owners(config)[layer_idx] != layer_idx)
    if letter == "M":
        return Mamba2(config)
    if letter == "H":  # Hedgehog linear attention with a softmax window (linear_attention.py)
        return LinearAttention(config)
    raise ValueError(f"no mixer for layer letter {letter!r}")


def make_ffn(config, layer_idx):
    """The MLP, or the sparse ffn of config.ffn on every moe_every-th layer (Jamba style)."""
    if config.ffn != "mlp" and layer_idx % config.moe_every == config.moe_every - 1:
        return MoE(config) if config.ffn == "moe" else PEER(config)
    return MLP(config)


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.mixer = make_mixer(config, config.layer_kinds()[layer_idx], layer_idx)
        self.ln_2 = make_norm(config)
        self.ffn = make_ffn(config, layer_idx)

    def forward(self, x, pos, cache=None):
        x = x + self.mixer(self.ln_1(x), pos, cache)  # (B, T, C)
        x = x + self.ffn(self.ln_2(x))  # (B, T, C)
        return x

    def flops_per_token(self, seq_len):
        return self.mixer.flops_per_token(seq_len) + self.ffn.flops_per_token(seq_len)

    def new_cache(self, batch_size, max_len, device, dtype):
        return self.mixer.new_cache(batch_size, max_len, device, dtype)


class Cache(list):
    """One cache per layer (from each mixer's new_cache), plus how many tokens they have seen."""

    def __init__(self, layer_caches):
        super().__init__(layer_caches)
        self.seen = 0

    def nbytes(self):
        """Bytes actually allocated by the caches (shared caches counted once)."""
        return sum(c.nbytes() for c in {id(c): c for c in self}.values())


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        for i in config.routed_layers():  # mixture-of-depths wraps whole blocks (mod.py)
            self.blocks[i] = MoD(self.blocks[i], config)
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        if config.bitnet != "none":  # ternary BitLinear layers swapped in place, init kept (bitnet.py)
            bitnet.apply(self, config.bitnet)

    def _init_weights(self, module):
        """GPT-2 init: N(0, 0.02); residual output projections scaled by 1/sqrt(2 n_layer)."""
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    # --------------------------------------------------------------------------------------------
    def forward(self, idx, targets=None, cache=None):
        """idx: (B, T) token ids. targets: (B, T) or None (-1 = ignore). cache: from new_cache().

        Returns (logits, loss); with config.loss="fused" and targets, logits is None (loss.py).
        Without targets only the last position's logits are computed,
        (B, 1, V), which is all that generation needs. With a cache the tokens continue the
        cached sequence and the cache is updated.
        """
        B, T = idx.shape
        start = cache.seen if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.wte(idx)  # (B, T, C)
        if self.wpe is not None:
            x = x + self.wpe(pos)  # (B, T, C)
        x = self.drop(x)
        if not self.config.residual_fp32 and torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))  # the stream in autocast's dtype (bf16)
        layer_caches = cache if cache is not None else shared_kv_slots(self.config)
        for block, layer_cache in zip(self.blocks, layer_caches):
            x = block(x, pos, layer_cache)  # (B, T, C)
        if cache is not None:
            cache.seen += T
        x = self.ln_f(x)  # (B, T, C)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V)
        if self.config.loss == "fused":  # the (B, T, V) logits are never made: logits is None
            return None, linear_cross_entropy(x, self.lm_head.weight, targets)
        logits = self.lm_head(x)  # (B, T, V)
        return logits, cross_entropy(logits, targets)

    def new_cache(self, batch_size, max_len=None, device=None, dtype=None):
        """Empty per-layer caches for generation (see each mixer's new_cache); the layers of a
        KV-sharing group get one cache object, their first layer's."""
        max_len = max_len or self.config.block_size
        device = device or self.wte.weight.device
        dtype = dtype or self.wte.weight.dtype
        return Cache(link_caches(kv_owners(self.config), lambda i: self.blocks[i].new_cache(
            batch_size, max_len, device, dtype)))

    # --------------------------------------------------------------------------------------------
    # Aux losses and stats: layers set `aux_loss` (a scalar tensor) and/or `stats` (a dict of tensors)
    # during forward; train.py adds the first to the loss and logs the second.

    def aux_loss(self):
        losses = [m.aux_loss for m in self.blocks.modules() if getattr(m, "aux_loss", None) is not None]
        return sum(losses) if losses else None

    def stats(self):
        return {f"blocks.{name}.{k}": v for name, m in self.blocks.named_modules()
                for k, v in (getattr(m, "stats", None) or {}).items()}

    def after_step(self):
        """Non-gradient updates after each optimizer step (e.g. MoE balancing bias)."""
        for m in self.blocks.modules():
            if hasattr(m, "after_step"):
                m.after_step()

    # --------------------------------------------------------------------------------------------
    # Counting, used for MFU in train.py and bench.py.

    def num_params(self, non_embedding=False):
        """Total parameters (tied weights counted once). non_embedding drops the position table,
        and the token table too when it is not tied to the head (it does no matmul work)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.wte.weight.numel()
        return n

    def active_params(self):
        """Parameters used for each token: the total, less what a token's sparse layers skip."""
        n = self.num_params()
        for m in self.blocks.modules():
            if hasattr(m, "active_params"):
                n -= sum(p.numel() for p in m.parameters()) - m.active_params()
        return n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6 per active weight in a
        matmul plus the attention term, summed over layers, plus the output head."""
        seq_len = seq_len or self.config.block_size
        head = 6 * self.lm_head.weight.numel()
        return head + sum(b.flops_per_token(seq_len) for b in self.blocks)


def compile_model(model, mode="default", blocks=False):
    """torch.compile for training; returns the module to call.

    Whole model (blocks=False): one graph, the fastest steps, but a cold compile of a 12-layer model
    takes about a minute. blocks=True compiles each Block in place instead ("regional
    compilation"): Dynamo compiles one block's code once and reuses it for every block of the same
    structure, so a cold compile takes seconds; the embedding, final norm, head and loss stay eager.
    """
    mode = None if mode == "default" else mode
    if not blocks:
        return torch.compile(model, mode=mode)
    for block in model.blocks:
        block.compile(mode=mode)
    return model


def graph_step(model, optimizer, step, batches, warmup=3):
    """CUDA graphs for training, compiled or not: the whole training step, `step(batches)` (forward,
    backward, gradient clipping, optimizer step), captured once as one CUDA graph, so the step no
    longer pays the CPU time of launching its kernels one by one, nor waits for the host. It pays
    where the host is the bottleneck: the eager baby GPT, 17.97 ms a step graphed against 19.11 ms
    on an H100; the compiled 16-expert MoE, 39.6 against 54.5 ms; the compiled GPT-2-124M, which
    hardly waits for the host, 27.14 against 27.53 ms (bench/RESULTS.md).

    batches: the micro-batches of one step, a list of (x, y) (values do not matter: the graph keeps
    copies that each call refills). Returns `replay(batches)`, which runs the step on new batches
    and returns copies of step's outputs (tensors). So every step takes exactly these shapes, and
    `step` must launch the same kernels every time: no host syncs, no data-dependent shapes. The
    routing layers keep to that in training: MoD takes a fixed top-k, MoE/MoA dispatch a fixed N·k
    rows through the grouped GEMM (bf16 on CUDA; their fp32 reference loop reads counts on the host
    and cannot be captured: that is reported), PEER a fixed top-k; their counters (MoE's load) are
    buffers updated in place. `step` must set its gradients to None first
    (zero_grad(set_to_none=True)) so that backward writes them afresh inside the graph. The learning
    rate is read from optimizer.param_groups at each replay, so the schedule works as before (fused
    AdamW and our Muon take it as a tensor on the device). `warmup` eager steps on a side stream
    (which CUDA graphs need before a capture) make the optimizer state; then the weights, buffers and
    state are put back as they were, so the run starts from where it stood."""
    device = next(model.parameters()).device
    static = [tuple(t.clone() for t in b) for b in batches]
    optimizers = getattr(optimizer, "optimizers", [optimizer])  # optim.Optimizers holds several
    groups = optimizer.param_groups
    tensors = [t.detach().clone() for t in (*model.parameters(), *model.buffers())]
    state = [{p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()}
             for opt in optimizers]
    saved = [{k: g[k] for k in ("lr", "capturable") if k in g} for g in groups]
    lr_tensors = [torch.tensor(float(g["lr"]), device=device) for g in groups]
    for g, t in zip(groups, lr_tensors):
        g["lr"] = t
        if "capturable" in g:
            g["capturable"] = True  # AdamW checks it under capture (fused keeps its step count on the device anyway)
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(static)
    except RuntimeError as e:
        raise ValueError(f"cuda_graph could not capture this model's training step ({str(e).splitlines()[0]}); "
                         "pass --cuda_graph false") from e
    finally:
        for g, before in zip(groups, saved):
            g.update(before)  # lr a float again, as the schedule and the checkpoints expect
    with torch.no_grad():  # undo the warm-up steps, in place (the graph holds these addresses)
        for t, before in zip((*model.parameters(), *model.buffers()), tensors):
            t.copy_(before)
        for opt, before in zip(optimizers, state):
            for p, s in opt.state.items():
                for k, v in s.items():
                    if torch.is_tensor(v):  # state made by the warm-up starts at zero
                        v.copy_(before[p][k]) if k in before.get(p, {}) else v.zero_()

    def replay(batches):
        for mine, new in zip(static, batches):
            for a, b in zip(mine, new):
                a.copy_(b)
        for g, t in zip(groups, lr_tensors):
            t.fill_(g["lr"])
        graph.replay()
        return tuple(t.clone() for t in out)  # the graph's outputs are overwritten by the next replay

    return replay


# Dense bf16 tensor-core peak, FLOP/s, by GPU name (datasheet figures, without sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
             "4090": 165e12, "3090": 71e12, "V100": 125e12}


def peak_flops(device="cuda"):
    """The GPU's bf16 peak from its name, or None when unknown (then MFU is not reported)."""
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)
