"""Configuration: one flat dataclass for the model (`GPTConfig`), one for the run (`TrainConfig`),
the named presets, and the `--key value` override parser that `train.py`, `bench.py` and the
notebooks share.

Fields are grouped by the file that uses them. Every check lives in `__post_init__`, so a bad
config fails when it is built, with a message that says what to change.
"""

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields


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
    # --- layer pattern (model.py): one letter per layer, repeated over n_layer -------------------
    layers: str = "G"            # G global attention
    # --- attention (attention.py, rope.py) ------------------------------------------------------
    pos: str = "learned"         # "learned" absolute positions | "rope" rotary (rope.py)
    rope_base: float = 10000.0   # RoPE frequency base θ
    rope_fraction: float = 1.0   # fraction of each head's dims that rotate (partial RoPE)
    # --- feed-forward (model.py) ----------------------------------------------------------------
    ffn: str = "mlp"             # "mlp"
    mlp_ratio: float = 4.0       # hidden width of the MLP = mlp_ratio * n_embd
    activation: str = "gelu"     # "gelu" | "relu2" (ReLU squared, Primer arXiv 2109.08668)

    def __post_init__(self):
        _check_choice(self, "norm", ("layernorm", "rmsnorm"))
        _check_choice(self, "pos", ("learned", "rope"))
        _check_choice(self, "ffn", ("mlp",))
        _check_choice(self, "activation", ("gelu", "relu2"))
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

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def rotary_dims(self):
        """How many dims of each head RoPE rotates: an even number."""
        return 2 * int(self.head_dim * self.rope_fraction // 2)

    def layer_kinds(self):
        """The letter of each of the n_layer layers: `layers` repeated and cut to length."""
        return (self.layers * math.ceil(self.n_layer / len(self.layers)))[: self.n_layer]


# The mixer letters of the layer pattern (model.py picks the module for each).
LAYER_LETTERS = {"G": "global attention"}


@dataclass
class TrainConfig:
    # --- data (loader.py) -----------------------------------------------------------------------
    dataset: str = "shakespeare_char"   # folder under data_dir made by data/data.py
    data_dir: str = "data"       # where datasets live (relative paths: to the repository root)
    batch_size: int = 12         # sequences per micro-step
    grad_accum: int = 1          # micro-steps per optimizer step
    # --- optimizer (optim.py) -------------------------------------------------------------------
    optimizer: str = "adamw"     # "adamw"
    lr: float = 6e-4             # peak learning rate
    min_lr: float = 6e-5         # learning rate at the end of the schedule
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0       # clip the global gradient norm (0 = off)
    schedule: str = "cosine"     # "cosine" (warmup + cosine decay) | "wsd" (warmup-stable-decay)
    warmup_iters: int = 100
    decay_frac: float = 0.2      # wsd only: fraction of max_iters spent decaying at the end
    max_iters: int = 5000
    # --- evaluation, logging, checkpoints (train.py) --------------------------------------------
    eval_interval: int = 250
    eval_iters: int = 20         # validation batches per evaluation (a fixed set)
    log_interval: int = 10
    out_dir: str = "out/run"
    seed: int = 1337
    device: str = "auto"         # "auto" | "cuda" | "mps" | "cpu"
    dtype: str = "auto"          # "auto" (bf16 on a capable GPU, else fp32) | "bfloat16" | "float32"
    compile: bool = True         # torch.compile the model (CUDA only)

    def __post_init__(self):
        _check_choice(self, "optimizer", ("adamw",))
        _check_choice(self, "schedule", ("cosine", "wsd"))
        _check_choice(self, "device", ("auto", "cuda", "mps", "cpu"))
        _check_choice(self, "dtype", ("auto", "bfloat16", "float32"))
        for name in ("batch_size", "grad_accum", "max_iters", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.warmup_iters < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("warmup_iters, weight_decay and grad_clip must be >= 0")
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
    "shakespeare-char": dict(
        dataset="shakespeare_char", out_dir="out/shakespeare-char",
        n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2,
        batch_size=64, lr=1e-3, min_lr=1e-4, beta2=0.99, warmup_iters=100, max_iters=5000,
        eval_interval=250, eval_iters=200, weight_decay=0.1,
    ),
    # A model that learns tiny shakespeare on a laptop CPU in about a minute.
    "cpu-tiny": dict(
        dataset="shakespeare_char", out_dir="out/cpu-tiny",
        n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0,
        batch_size=32, lr=2e-3, min_lr=2e-4, beta2=0.99, warmup_iters=50, max_iters=1200,
        eval_interval=200, eval_iters=20, compile=False,
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
        raise ValueError(f"--{key} expects a {kind.__name__}, got {text!r}") from None


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
