"""Configuration: one flat dataclass for the model (`GPTConfig`), one for the run (`TrainConfig`),
the named presets, and the `--key value` override parser that `train.py`, `bench.py` and the
notebooks share.

Fields are grouped by the file that uses them. Every check lives in `__post_init__`, so a bad
config fails when it is built, with a message that says what to change.
"""

import dataclasses
import difflib
import math
from dataclasses import dataclass, fields


@dataclass
class GPTConfig:
    # --- size (model.py) ------------------------------------------------------------------------
    vocab_size: int = 50304      # GPT-2's 50257 padded up to a multiple of 128 (faster matmuls)
    block_size: int = 1024       # context length T
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False           # biases in Linear and LayerNorm (GPT-2 had them; not needed)
    norm: str = "layernorm"      # "layernorm" | "rmsnorm"
    tie_weights: bool = True     # the output head shares the token embedding matrix
    loss: str = "full"           # "full": logits (B, T, V) then cross-entropy | "fused": head and
    #                              cross-entropy chunk by chunk, logits never held whole (loss.py)
    residual_fp32: bool = True   # under autocast the residual stream stays fp32 (nanoGPT); False: it
    #                              runs in autocast's dtype, half the bytes per residual add and norm
    # --- layer pattern (model.py): one letter per layer, repeated over n_layer -------------------
    layers: str = "G"            # G global attention, L local (sliding-window) attention, M Mamba-2,
    #                              H linear attention (linear_attention.py)
    # --- attention (attention.py, rope.py) ------------------------------------------------------
    pos: str = "learned"         # "learned" absolute positions | "rope" rotary (rope.py)
    rope_base: float = 10000.0   # RoPE frequency base θ
    rope_fraction: float = 1.0   # fraction of each head's dims that rotate (partial RoPE)
    n_kv_head: int = 0           # key/value heads (GQA; 1 = MQA); 0 = n_head (plain multi-head)
    window: int = 1024           # L layers: a query sees itself and the window-1 tokens before it
    kv_share: int = 1            # groups of kv_share consecutive G (or L) layers share one K/V
    attn: str = "mha"            # how attention layers attend: "mha" (attention.py) | "mla" (mla.py)
    qk_norm: bool = False        # RMS-normalise each head's queries and keys before attending
    # --- multi-head latent attention (mla.py); 0 = derived from head_dim, see mla_dims() ----------
    q_lora_rank: int = 0         # query bottleneck width (0 = plain projection, no bottleneck)
    kv_lora_rank: int = 0        # width of the cached key/value latent c_kv (0: 4 * head_dim)
    qk_nope_head_dim: int = 0    # per-head query/key dims without RoPE (0: head_dim)
    qk_rope_head_dim: int = 0    # per-head rotary dims; its key is shared by all heads (0: head_dim / 2)
    v_head_dim: int = 0          # per-head value dims (0: head_dim)
    # --- feed-forward (model.py) ----------------------------------------------------------------
    ffn: str = "mlp"             # "mlp" | "moe" (moe.py) | "peer" (peer.py)
    mlp_ratio: float = 4.0       # hidden width of the MLP = mlp_ratio * n_embd
    activation: str = "gelu"     # "gelu" | "relu2" (ReLU squared, Primer arXiv 2109.08668)
    moe_every: int = 1           # the sparse ffn replaces every k-th MLP (layers k-1, 2k-1, ...), MLP elsewhere
    # --- mixture of experts (moe.py); defaults: DeepSeekMoE 16B's 64 routed (top 6) + 2 shared ----
    n_expert: int = 64           # routed experts per MoE layer
    n_expert_active: int = 6     # routed experts per token (top-k)
    n_shared_expert: int = 2     # always-on shared experts
    moe_hidden: int = 0          # hidden width of one expert (0: mlp_ratio * n_embd / (k + shared),
    #                              so a token's active ffn weights equal the dense MLP's; see expert_hidden)
    moe_score: str = "sigmoid"   # router affinity: "sigmoid" (DeepSeek-V3) | "softmax"
    bias_update_rate: float = 1e-3  # γ of the aux-loss-free balancing bias (0 = off; V3: 0.001)
    moe_aux_coef: float = 0.0    # weight α of the Switch balance loss (0 = off; Switch: 0.01)
    attn_experts: int = 0        # mixture of attention heads (moe.py MoA): experts per G layer (0 = off)
    attn_experts_active: int = 2  # attention experts per token; each has n_head / this query heads
    # --- PEER (peer.py): n_expert = peer_keys ** peer_key_sets single-neuron experts -------------
    peer_keys: int = 1024        # sub-keys per key set (paper: 1024, so 1024^2 = 1M experts)
    peer_key_sets: int = 2       # key sets in the Cartesian product (2: product keys)
    peer_key_dim: int = 128      # query/key dims per key set
    peer_heads: int = 8          # retrieval heads (paper: 8)
    peer_topk: int = 16          # experts per head (paper: 16)
    # --- Mamba-2 (mamba.py): the layers lettered M; defaults are the paper's but for the chunk ------
    mamba_d_state: int = 128     # N: state size per head (per channel of the head)
    mamba_d_conv: int = 4        # width of the causal depthwise convolution
    mamba_expand: int = 2        # inner width d_inner = mamba_expand * n_embd
    mamba_head_dim: int = 64     # P: channels per head; heads = d_inner / mamba_head_dim
    mamba_n_groups: int = 1      # groups of heads sharing B and C (like GQA's key/value groups)
    mamba_chunk_size: int = 128  # Q: tokens per chunk of the scan (speed only; the paper: 256; 128 was
    #                              fastest on our H100, see bench/RESULTS.md)
    # --- linear attention (linear_attention.py): the layers lettered H ----------------------------
    linear_window: int = 64      # w: softmax over the last w tokens, Hedgehog linear attention before
    #                              them, one normaliser (LoLCATs: 64); 0 = linear attention only
    linear_features: int = 0     # f: Hedgehog feature-map width per sign (φ has 2f); 0 = head_dim
    # --- mixture-of-depths (mod.py): a router lets only the top tokens through a block ----------
    mod_every: int = 0           # route every k-th block (layers k-1, 2k-1, ...); 0 = off
    mod_capacity: float = 0.125  # fraction of a sequence's tokens a routed block processes (paper: 0.125)
    mod_predictor_hidden: int = 64  # hidden width of the causal routing predictor (an MLP on the block input)
    # --- BitNet b1.58 (bitnet.py): which linear layers become ternary BitLinear -------------------
    bitnet: str = "none"          # "none" | "ffn" | "all_but_attention" (ffn + Mamba) | "all"; embeddings,
    #                              the head and routers stay full precision (bitnet.py lists each layer)

    def __post_init__(self):
        _check_choice(self, "norm", ("layernorm", "rmsnorm"))
        _check_choice(self, "pos", ("learned", "rope"))
        _check_choice(self, "attn", ("mha", "mla"))
        _check_choice(self, "ffn", ("mlp", "moe", "peer"))
        _check_choice(self, "moe_score", ("sigmoid", "softmax"))
        _check_choice(self, "activation", ("gelu", "relu2"))
        _check_choice(self, "loss", ("full", "fused"))
        _check_choice(self, "bitnet", ("none", "ffn", "all_but_attention", "all"))
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                             f"try n_embd={self.n_head * max(1, round(self.n_embd / self.n_head))}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.layers or set(self.layers) - set(LAYER_LETTERS):
            raise ValueError(f"layers={self.layers!r}: use the letters "
                             + ", ".join(f"{k} ({v})" for k, v in LAYER_LETTERS.items()))
        if not 0.0 < self.rope_fraction <= 1.0:
            raise ValueError(f"rope_fraction must be in (0, 1], got {self.rope_fraction}")
        if self.pos == "rope" and self.rotary_dims < 2:
            raise ValueError("rope_fraction leaves no pair of dims to rotate; raise it")
        if self.n_kv_head < 0 or self.n_head % self.kv_heads:
            divisors = [d for d in range(1, self.n_head + 1) if self.n_head % d == 0]
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}): "
                             f"use one of {divisors}, or 0 for n_head")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.linear_window < 0 or self.linear_features < 0:
            raise ValueError(f"linear_window and linear_features must be >= 0 (0: linear attention only; "
                             f"0: head_dim features), got {self.linear_window} and {self.linear_features}")
        if self.kv_share < 1:
            raise ValueError(f"kv_share must be >= 1 (1 = no sharing), got {self.kv_share}")
        if (self.kv_share > 1 or "L" in self.layers) and self.attn_experts:
            raise ValueError("local layers (L) and kv_share > 1 are built on multi-head or latent attention "
                             "(attention.py, mla.py): use attn_experts=0 with them")
        self._check_mla()
        self._check_experts()
        self._check_mamba()
        self._check_mod()

    def _check_mla(self):
        names = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        for name in names:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = the default), got {getattr(self, name)}")
        if self.attn != "mla":
            set_here = [n for n in names if getattr(self, n)]
            if set_here:
                raise ValueError(f"{', '.join(set_here)} only apply to attn='mla' (attn is {self.attn!r}); "
                                 "set attn='mla' or leave them at 0")
            return
        if self.mla_dims()["qk_rope_head_dim"] % 2:
            raise ValueError(f"qk_rope_head_dim must be even (RoPE turns pairs of dims), "
                             f"got {self.qk_rope_head_dim}")
        if self.n_kv_head not in (0, self.n_head):
            raise ValueError("n_kv_head does not apply to attn='mla' (all heads read one shared latent; "
                             "kv_lora_rank sets its size): leave n_kv_head at 0")
        if self.qk_norm:
            raise ValueError("qk_norm does not apply to attn='mla': a norm of each head's keys would "
                             "stop W_uk from being absorbed into the query; set qk_norm=False")

    def _check_mamba(self):
        names = ("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_head_dim", "mamba_n_groups",
                 "mamba_chunk_size")
        for name in names:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if "M" not in self.layers:
            return
        d_inner = self.mamba_expand * self.n_embd
        if d_inner % self.mamba_head_dim:
            raise ValueError(f"the Mamba inner width mamba_expand * n_embd = {d_inner} must be divisible by "
                             f"mamba_head_dim ({self.mamba_head_dim}); try mamba_head_dim="
                             f"{math.gcd(d_inner, self.mamba_head_dim)}")
        if (d_inner // self.mamba_head_dim) % self.mamba_n_groups:
            raise ValueError(f"the {d_inner // self.mamba_head_dim} Mamba heads must split evenly into "
                             f"mamba_n_groups ({self.mamba_n_groups}) groups")

    def _check_experts(self):
        if self.moe_every < 1:
            raise ValueError(f"moe_every must be >= 1 (1 = every layer), got {self.moe_every}")
        if self.ffn == "moe" and not 1 <= self.n_expert_active <= self.n_expert:
            raise ValueError(f"need 1 <= n_expert_active <= n_expert, got {self.n_expert_active} "
                             f"and {self.n_expert}")
        if self.n_shared_expert < 0 or self.moe_hidden < 0:
            raise ValueError("n_shared_expert and moe_hidden must be >= 0")
        if self.bias_update_rate < 0 or self.moe_aux_coef < 0:
            raise ValueError("bias_update_rate and moe_aux_coef must be >= 0 (0 = off)")
        if self.attn_experts < 0:
            raise ValueError(f"attn_experts must be >= 0 (0 = dense attention), got {self.attn_experts}")
        if self.attn_experts:
            if self.attn != "mha":
                raise ValueError(f"attn_experts (mixture of attention heads) needs attn='mha', got {self.attn!r}")
            if not 1 <= self.attn_experts_active <= self.attn_experts:
                raise ValueError(f"need 1 <= attn_experts_active <= attn_experts, got "
                                 f"{self.attn_experts_active} and {self.attn_experts}")
            if self.n_kv_head not in (0, self.n_head):
                raise ValueError("n_kv_head does not apply to attn_experts: the shared key/value "
                                 "projection has n_head / attn_experts_active heads; leave n_kv_head at 0")
            if self.n_head % self.attn_experts_active:
                raise ValueError(f"n_head ({self.n_head}) must be divisible by attn_experts_active "
                                 f"({self.attn_experts_active}): each expert has n_head / k query heads")
        if self.ffn == "peer":
            for name in ("peer_keys", "peer_key_sets", "peer_key_dim", "peer_heads", "peer_topk"):
                if getattr(self, name) < 1:
                    raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.peer_topk > self.peer_keys:
                raise ValueError(f"peer_topk ({self.peer_topk}) must be <= peer_keys ({self.peer_keys}): "
                                 "each key set gives its top-k")

    def _check_mod(self):
        if self.mod_every < 0 or self.mod_every > self.n_layer:
            raise ValueError(f"mod_every must be in 0 .. n_layer ({self.n_layer}) (0 = no routed block), "
                             f"got {self.mod_every}")
        if not 0.0 < self.mod_capacity <= 1.0:
            raise ValueError(f"mod_capacity must be in (0, 1], got {self.mod_capacity}")
        if self.mod_predictor_hidden < 1:
            raise ValueError(f"mod_predictor_hidden must be >= 1, got {self.mod_predictor_hidden}")
        kinds = self.layer_kinds()
        for i in self.routed_layers():
            if kinds[i] not in ("G", "L"):
                raise ValueError(f"layer {i} is routed (mod_every={self.mod_every}) but is {kinds[i]!r}: only "
                                 "attention layers (G, L) can be routed; change layers or mod_every")
        if self.mod_every and self.kv_share > 1:
            raise ValueError("mod_every > 0 needs kv_share=1: a routed layer caches its own token subset")

    def routed_layers(self):
        """Indices of the layers wrapped by mixture-of-depths (mod.py): every mod_every-th."""
        k = self.mod_every
        return [i for i in range(self.n_layer) if k and i % k == k - 1]

    @property
    def expert_hidden(self):
        """Hidden width of one MoE expert: moe_hidden, or the width that matches the dense MLP,
        rounded to a multiple of 8 (rows of 16 bytes in bf16, as the grouped GEMM needs)."""
        if self.moe_hidden:
            return self.moe_hidden
        width = self.mlp_ratio * self.n_embd / (self.n_expert_active + self.n_shared_expert)
        return max(8, 8 * round(width / 8))

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def kv_heads(self):
        """Key/value heads: n_kv_head, or n_head when it is 0."""
        return self.n_kv_head or self.n_head

    @property
    def rotary_dims(self):
        """How many dims of each head RoPE rotates: an even number."""
        return 2 * int(self.head_dim * self.rope_fraction // 2)

    def mla_dims(self):
        """The MLA sizes with 0 replaced by the defaults: DeepSeek-V2's ratios to the head width
        (arXiv 2405.04434: d_c = 512 = 4 d_h, d_h^R = 64 = d_h / 2), no query bottleneck."""
        hs = self.head_dim
        return dict(q_lora_rank=self.q_lora_rank,
                    kv_lora_rank=self.kv_lora_rank or 4 * hs,
                    qk_nope_head_dim=self.qk_nope_head_dim or hs,
                    qk_rope_head_dim=self.qk_rope_head_dim or max(2, 2 * (hs // 4)),
                    v_head_dim=self.v_head_dim or hs)

    def layer_kinds(self):
        """The letter of each of the n_layer layers: `layers` repeated and cut to length."""
        return (self.layers * math.ceil(self.n_layer / len(self.layers)))[: self.n_layer]


# The mixer letters of the layer pattern (model.py picks the module for each).
LAYER_LETTERS = {"G": "global attention", "L": "local (sliding-window) attention", "M": "Mamba-2 (mamba.py)",
                 "H": "Hedgehog linear attention + softmax window (linear_attention.py)"}


@dataclass
class TrainConfig:
    # --- data (loader.py) -----------------------------------------------------------------------
    dataset: str = "shakespeare_char"   # folder under data_dir made by data/data.py
    data_dir: str = "data"       # where datasets live (relative paths: to the repository root)
    batch_size: int = 12         # sequences per micro-step
    grad_accum: int = 1          # micro-steps per optimizer step
    # --- optimizer (optim.py) -------------------------------------------------------------------
    optimizer: str = "adamw"     # "adamw" | "muon" (Muon for hidden matrices, AdamW for the rest)
    lr: float = 6e-4             # peak learning rate
    min_lr: float = 6e-5         # learning rate at the end of the schedule
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    muon_lr: float = 0.02        # muon only: peak lr of the Muon matrices (same schedule as lr)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0  # decoupled, multiplied by the Muon lr like torch.optim.Muon's
    grad_clip: float = 1.0       # clip the global gradient norm (0 = off)
    schedule: str = "cosine"     # "cosine" (warmup + cosine decay) | "wsd" (warmup-stable-decay)
    warmup_iters: int = 100
    decay_frac: float = 0.2      # wsd only: fraction of the schedule spent decaying at the end
    max_iters: int = 5000        # the run stops after this many optimizer steps
    lr_decay_iters: int = 0      # length of the LR schedule; 0 = max_iters. Set it to stop early and
                                 # later --resume with a larger max_iters on the same schedule
    # --- evaluation, logging, checkpoints (train.py) --------------------------------------------
    eval_interval: int = 250
    eval_iters: int = 20         # validation batches per evaluation (a fixed set)
    log_interval: int = 10
    out_dir: str = "out/run"
    seed: int = 1337
    device: str = "auto"         # "auto" | "cuda" | "mps" | "cpu"
    dtype: str = "auto"          # "auto" (bf16 on a capable GPU, else fp32) | "bfloat16" | "float32"
    compile: bool = True         # torch.compile the model (CUDA only)
    keep_checkpoints: int = 1    # ckpt.pt, plus for K > 1 the last K as ckpt-<step>.pt (checkpoint.py)
    save_interval: int = 0       # write ckpt.pt and loss.png at the evaluations of steps > 0 divisible
    #                              by this, and the last; 0 = at every evaluation. Each write costs ~0.5 s
    max_bad_steps: int = 10      # stop after this many consecutive steps with a non-finite loss or
                                 # gradient norm (each is skipped: no update)
    compile_mode: str = "default"  # "default" | "max-autotune-no-cudagraphs" | "max-autotune" | "reduce-overhead"
    compile_blocks: bool = False  # compile each block on its own: seconds instead of a minute (model.py)
    cuda_graph: bool = False     # replay the whole training step (forward, backward, optimizer) as one
    #                              CUDA graph, compiled or not (model.py graph_step; CUDA only)
    # --- several GPUs / nodes under torchrun (distributed.py) -------------------------------------
    parallel: str = "ddp"        # "ddp" | "fsdp" (sharded, FSDP2) | "diloco" (low-communication)
    diloco_inner_steps: int = 50  # DiLoCo: inner steps H between synchronisations
    diloco_outer_lr: float = 0.7  # DiLoCo: outer Nesterov SGD learning rate (the paper's 0.7)
    diloco_outer_momentum: float = 0.9  # DiLoCo: outer momentum (0 = plain SGD)

    def __post_init__(self):
        _check_choice(self, "optimizer", ("adamw", "muon"))
        _check_choice(self, "compile_mode", ("default", "max-autotune-no-cudagraphs", "max-autotune",
                                             "reduce-overhead"))
        _check_choice(self, "schedule", ("cosine", "wsd"))
        _check_choice(self, "parallel", ("ddp", "fsdp", "diloco"))
        if self.diloco_inner_steps <= 0 or self.diloco_outer_lr <= 0 or not 0 <= self.diloco_outer_momentum < 1:
            raise ValueError("need diloco_inner_steps > 0, diloco_outer_lr > 0, 0 <= diloco_outer_momentum < 1")
        if self.cuda_graph and self.compile and self.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile_mode={self.compile_mode!r} makes CUDA graphs of its own, which cannot be "
                             "captured inside cuda_graph's: use compile_mode='default' or "
                             "'max-autotune-no-cudagraphs' with cuda_graph=true, or cuda_graph=false")
        if self.parallel == "fsdp" and self.optimizer == "muon":
            raise ValueError("Muon needs whole matrices; with parallel=fsdp use optimizer=adamw (or parallel=ddp)")
        _check_choice(self, "device", ("auto", "cuda", "mps", "cpu"))
        _check_choice(self, "dtype", ("auto", "bfloat16", "float32"))
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval",
                     "keep_checkpoints", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if min(self.warmup_iters, self.lr_decay_iters, self.weight_decay, self.grad_clip) < 0:
            raise ValueError("warmup_iters, lr_decay_iters, weight_decay and grad_clip must be >= 0")
        if self.save_interval < 0:
            raise ValueError(f"save_interval must be >= 0 (0 = at every evaluation), got {self.save_interval}")
        if self.muon_lr <= 0 or self.muon_weight_decay < 0 or not 0 <= self.muon_momentum < 1:
            raise ValueError(f"need muon_lr > 0, muon_weight_decay >= 0 and 0 <= muon_momentum < 1, got "
                             f"{self.muon_lr}, {self.muon_weight_decay}, {self.muon_momentum}")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise ValueError(f"decay_frac must be in [0, 1], got {self.decay_frac}")


def _check_choice(cfg, name, choices):
    value = getattr(cfg, name)
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


# ------------------------------------------------------------------------------------------------
# Presets: named overrides of the defaults above, for both dataclasses.

PRESETS = {
    # nanoGPT's baby GPT on characters (6 layers, 6 heads, 384 wide, context 256, batch 64).
    # nanoGPT runs 5000 steps, but its val loss is best near step 1750 and then overfits: a
    # 2500-step schedule reaches the same best in half the time.
    "shakespeare-char": dict(
        dataset="shakespeare_char", out_dir="out/shakespeare-char",
        n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
        batch_size=64, lr=1e-3, min_lr=1e-4, beta2=0.99, warmup_iters=100, max_iters=2500,
        eval_interval=250, eval_iters=200, weight_decay=0.1,
    ),
    # The same baby GPT, set up to reach val loss 1.47 fast on one GPU (issue 10: within 25 s of
    # launch, cold compile cache): Muon for the hidden matrices, RoPE, QK-norm, ReLU^2, a 600-step
    # warmup-stable-decay schedule, the whole validation split (6 batches) at each evaluation,
    # ckpt.pt and loss.png only at the end (~0.5 s each time), and no compile (a cold compile of the
    # whole model takes longer than the run) but the whole training step replayed as one CUDA graph
    # (on an H100: 1.4605 and 1.4553 at step 600, 19.8 s and 18.2 s after launch; bench/RESULTS.md).
    # A longer schedule with more regularisation reaches a lower loss: --max_iters 2500 --dropout
    # 0.3 --muon_weight_decay 0.1 (best 1.4099-1.4127, three seeds).
    "shakespeare-char-speedrun": dict(
        dataset="shakespeare_char", out_dir="out/shakespeare-char-speedrun",
        n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
        pos="rope", qk_norm=True, activation="relu2",
        optimizer="muon", muon_lr=0.03, lr=2e-3, min_lr=2e-4, beta2=0.99, weight_decay=0.1,
        schedule="wsd", decay_frac=0.4, warmup_iters=50, max_iters=600,
        batch_size=64, eval_interval=100, eval_iters=6, log_interval=50, save_interval=600,
        compile=False, cuda_graph=True,
    ),
    # A model that learns tiny shakespeare on a laptop CPU in about a minute and a half (val loss
    # ~1.7 on 2 cores). RoPE and ReLU^2 buy more per second here than learned positions and GELU.
    "cpu-tiny": dict(
        dataset="shakespeare_char", out_dir="out/cpu-tiny",
        n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, pos="rope", activation="relu2",
        batch_size=32, lr=2e-3, min_lr=2e-4, beta2=0.99, warmup_iters=50, max_iters=700,
        eval_interval=100, eval_iters=20, compile=False,
    ),
    # Mixture of mixtures (issue 7, the seed design "MoM"): cpu-tiny's size in Jamba-style blocks with
    # the mixtures on: Mamba-2 and attention layers, a DeepSeekMoE feed-forward in every block, the
    # mixture of attention heads in the attention layers (moe.py's MoA: 4 experts of 2 query heads,
    # 2 per token), and mixture-of-depths routing the attention blocks (mod.py).
    "mixture-of-mixtures": dict(
        dataset="shakespeare_char", out_dir="out/mixture-of-mixtures",
        n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, layers="MG", pos="rope",
        ffn="moe", moe_every=1, n_expert=8, n_expert_active=2, n_shared_expert=1,
        attn_experts=4, attn_experts_active=2,
        mamba_d_state=16, mamba_head_dim=32, mamba_chunk_size=16,
        mod_every=2, mod_capacity=0.25,
        batch_size=32, lr=2e-3, min_lr=2e-4, beta2=0.99, warmup_iters=50, max_iters=1200,
        eval_interval=200, eval_iters=20, compile=False,
    ),
    # The baby GPT on tiny shakespeare in BPE tokens (python data/data.py shakespeare --tokenizer bpe
    # --vocab-size 2048: 320K training tokens), the base of the concept comparisons in bench/gpu_check.sh
    # (dense vs MoE, BitNet, Mamba hybrid, MoD at equal FLOPs, linearized). 800 steps are 20 epochs:
    # the val loss is best after a few and then overfits, so compare the curves and the best values.
    "shakespeare-bpe": dict(
        dataset="shakespeare_bpe", out_dir="out/shakespeare-bpe",
        n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
        batch_size=32, lr=1e-3, min_lr=1e-4, beta2=0.99, warmup_iters=50, max_iters=800,
        eval_interval=50, eval_iters=20, weight_decay=0.1, compile=False,
    ),
    # GPT-2 small (124M) on GPT-2 tokens.
    "gpt2-124m": dict(
        dataset="tinystories_gpt2", out_dir="out/gpt2-124m",
        n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304,
        batch_size=12, grad_accum=40, lr=6e-4, min_lr=6e-5, warmup_iters=700, max_iters=20000,
        eval_interval=1000, eval_iters=50,
    ),
}


def split_fields(overrides):
    """Split a flat dict of overrides into (GPTConfig kwargs, TrainConfig kwargs)."""
    model_keys = {f.name for f in fields(GPTConfig)}
    train_keys = {f.name for f in fields(TrainConfig)}
    unknown = [k for k in overrides if k not in model_keys | train_keys]
    if unknown:
        raise ValueError(unknown_key_message(unknown[0], model_keys | train_keys))
    return ({k: v for k, v in overrides.items() if k in model_keys},
            {k: v for k, v in overrides.items() if k in train_keys})


def unknown_key_message(key, valid):
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    return f"unknown config key {key!r}.{hint} Valid keys: {', '.join(sorted(valid))}"


def field_types():
    """name -> default value's type, for every field of both dataclasses."""
    out = {}
    for cls in (GPTConfig, TrainConfig):
        for f in fields(cls):
            out[f.name] = type(f.default)
    return out


def parse_value(key, text, kind):
    """Convert the command-line string `text` to the type of field `key`, or say why not."""
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key} expects true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--{key} expects {'an' if kind is int else 'a'} {kind.__name__}, got {text!r}") from None


def parse_overrides(argv):
    """Turn ['--n_layer', '4', '--lr=1e-3', ...] into {'n_layer': 4, 'lr': 0.001, ...}.

    Dashes in keys are accepted for underscores (`--block-size 64`). Unknown keys fail with the
    closest valid ones; values are converted to the field's type.
    """
    types = field_types()
    out, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"expected --key value, got {arg!r}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ValueError(f"{arg} needs a value")
            key, text = arg[2:], argv[i + 1]
            i += 2
        key = key.replace("-", "_")
        if key not in types:
            raise ValueError(unknown_key_message(key, types))
        out[key] = parse_value(key, text, types[key])
    return out


def build(preset=None, overrides=None):
    """GPTConfig and TrainConfig from a preset name plus overrides (later wins)."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    merged = {**(PRESETS[preset] if preset else {}), **(overrides or {})}
    model_kw, train_kw = split_fields(merged)
    return GPTConfig(**model_kw), TrainConfig(**train_kw)


def to_dict(cfg):
    return dataclasses.asdict(cfg)
