"""BitNet b1.58: linear layers whose weights are ternary, {-1, 0, +1} times one scale per matrix, and
whose inputs are 8-bit integers times one scale per token; trained through the rounding with the
straight-through estimator, run after training as packed 2-bit weights and an integer matmul.

Ma et al., "The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits", arXiv 2402.17764,
with its "Training Tips, Code and FAQ"; Wang et al., "BitNet: Scaling 1-bit Transformers for Large
Language Models", arXiv 2310.11453 (BitLinear).

    u   = RMSNorm(x)                                              the layer's own norm (see below)
    s_x = 127 / max_j |u_j|        x_q = clamp(round(u s_x), -128, 127)     per token: int8
    β   = mean_ij |W_ij|           W_q = clamp(round(W / β), -1, 1)         per matrix: ternary
    y   = (x_q W_q^T) β / s_x  (+ b)                              one integer matmul, one rescale

Training (`BitLinear`, a drop-in nn.Linear) keeps the full-precision "latent" W that the optimizer
updates, and computes y from the quantised values. Rounding has zero gradient almost everywhere, so
the backward pass treats it as the identity (straight-through estimator, `ste`): the gradients are
those of a plain linear layer y = v V^T + b evaluated at the quantised point v = x_q / s_x,
V = β W_q, passed on unchanged to u and to the latent W:

    dL/dW = (dL/dy)^T v,      dL/du = (dL/dy) V      (then the norm's backward to x)

The matmul itself multiplies the integers, x_q W_q^T, held in the float dtype, and rescales after:
integer sums below 2^24 are exact in fp32, so in fp32 the training forward is bit for bit the
packed integer path below (in bf16, to bf16 rounding). Every step is tensor arithmetic with no
Python branch on data: torch.compile fuses the norm, absmax, rounding and absmean around the matmul.

The norm. The tips' BitLinear normalises its input, and the b1.58 models drop the block's pre-norm
for it. Here the block's pre-norm stays: the surgery swaps nn.Linear modules and nothing else, and in
"ffn" / "all_but_attention" the full-precision mixers still need it. Where the input already comes
out of a norm (c_attn, c_fc, in_proj, and Mamba's out_proj after its gated norm) the two compose to
one norm whose gain is the product of theirs: an RMSNorm of a normalised vector only rescales each
token, and absmax quantisation does not see a per-token scale (round(λu · 127 / max|λu|) =
round(u · 127 / max|u|)), so the cost is one fused reduction. Where it does not (c_proj after GELU
or attention) this norm is what keeps the quantiser's input at unit scale: the "SubLN" place of
BitNet b1.58 2B4T (arXiv 2504.12285). Its gain is learnt (initialised to 1), as in that model.

Which layers (config.bitnet). Embeddings and the output head always stay full precision, and so does
everything that chooses where tokens go (the MoE/MoA `Router`, the MoD router and predictor, PEER's
product-key query), where rounding would flip the top-k.
    "ffn"                the nn.Linear layers of each block's feed-forward: the MLP's c_fc and c_proj;
                         in an MoE layer the shared experts (the routed experts are 3-D parameters fed
                         to the grouped GEMM, not nn.Linear: they stay full precision); PEER layers
                         stay full precision (their experts are gathered rows of two tables)
    "all_but_attention"  ffn, plus the mixers that are not attention: Mamba-2's in_proj and out_proj
                         (its depthwise conv, A, D and dt stay full precision)
    "all"                every mixer too: attention's c_attn, c_proj (G, L, and the Hedgehog linear
                         attention H, whose feature maps are not nn.Linear and stay full precision);
                         MLA's wq (or wq_a, wq_b), wkv_a, c_proj, but not wkv_b, whose weight the
                         decoding path absorbs into the query and output (mla.py's `absorbed` reads it
                         directly); MoA's shared c_kv (its routed wq, wo are 3-D: full precision)

Export (`export`, `python -m gpt.bitnet out/run`): every BitLinear becomes a `PackedBitLinear`, its
weight 2 bits per value, 4 to a byte along the input dimension (padded with code 1 = weight 0),

    code = W_q + 1 in {0, 1, 2},     byte = c_0 | c_1 << 2 | c_2 << 4 | c_3 << 6

plus β (fp32), the norm gain and the bias: 2 bits per weight where bf16 needs 16 (log2 3 = 1.58 bits
would be the entropy limit; 2 bits keep unpacking to shifts and masks). At inference the int8 x_q
and the unpacked int8 W_q meet in an integer matmul: `torch._int_mm` on a CUDA GPU (cuBLASLt,
int8 x int8 -> int32; it needs more than 16 rows and sizes that are multiples of 8: the operands
are zero-padded), an int32 matmul on the CPU (the reference; exact, as |x_q W_q^T| <= 128 K < 2^31).
Weights stay packed in memory and are unpacked at each call. The packed checkpoint holds only tensors
and plain data (it loads with weights_only=True); `sampling.py` runs it:

    python -m gpt.bitnet out/run                          # out/run/ckpt.pt -> out/run/packed.pt
    python sampling.py --out_dir out/run/packed.pt

Config: bitnet.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from gpt import checkpoint
from gpt.mamba import Mamba2
from gpt.mla import MultiHeadLatentAttention
from gpt.moe import Router
from gpt.peer import PEER

EPS = 1e-5  # floor of the scales' denominators (the training tips' value)


# ------------------------------------------------------------------------------------------------
# Quantisers and the straight-through estimator

def absmax_int8(x):
    """Per-token absmax: x (..., K) -> (x_q, s), x_q = clamp(round(x s), -128, 127) integers (as
    fp32) and s = 127 / max|x| (..., 1) fp32, so that x ~ x_q / s."""
    s = 127.0 / x.float().abs().amax(dim=-1, keepdim=True).clamp(min=EPS)  # (..., 1)
    return (x.float() * s).round().clamp(-128, 127), s


def ternary(w):
    """Per-matrix absmean: w (N, K) -> (w_q, β), w_q = clamp(round(w / β), -1, 1) in {-1, 0, 1}
    (as fp32) and β = mean|w| (0-d fp32), so that w ~ β w_q."""
    beta = w.float().abs().mean().clamp(min=EPS)
    return (w.float() / beta).round().clamp(-1, 1), beta


def ste(x, q):
    """q in the forward pass (exactly: x - x.detach() is 0), the identity's gradient to x in the
    backward pass: the straight-through estimator. In x's dtype (q's values are small integers,
    exact in bf16)."""
    return q.detach().to(x.dtype) + (x - x.detach())


# ------------------------------------------------------------------------------------------------
# Training: BitLinear

class BitLinear(nn.Linear):
    """nn.Linear with ternary weights and int8 inputs (fake-quantised: the values are on the integer
    grids, the matmul runs in the float dtype). `weight` is the latent full-precision matrix."""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.norm = nn.RMSNorm(in_features, eps=1e-6, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear):
        """A BitLinear holding linear's own weight and bias Parameters (their init is kept)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x):
        u = self.norm(x)  # (..., K)
        x_q, s = absmax_int8(u.detach())  # (..., K) integers, (..., 1): s is a constant to autograd
        w_q, beta = ternary(self.weight.detach())  # (N, K) in {-1, 0, 1}, (): β a constant too
        a = ste((u * s).to(u.dtype), x_q)  # x_q; gradient to u s (so dL/du = s dL/da)
        b = ste((self.weight / beta).to(self.weight.dtype), w_q)  # W_q; gradient to W / β
        y = F.linear(a, b)  # (..., N): x_q W_q^T, integer sums (exact in fp32)
        y = y * (beta / s).to(y.dtype)  # (..., N) = (x_q / s) (β W_q)^T
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _swap(module):
    """Replace, in place, every nn.Linear under module by a BitLinear, except in a router."""
    if isinstance(module, (Router, PEER)):  # they choose where tokens go: full precision
        return
    for name, child in list(module.named_children()):
        if isinstance(module, MultiHeadLatentAttention) and name == "wkv_b":  # absorbed when decoding
            continue
        if type(child) is nn.Linear:
            setattr(module, name, BitLinear.from_linear(child))
        else:
            _swap(child)


def apply(model, which):
    """Model surgery: swap the nn.Linear layers that config.bitnet = `which` names (see the module
    docstring) for BitLinear, in place. Called at the end of GPT.__init__."""
    if which not in ("ffn", "all_but_attention", "all"):
        raise ValueError(f"bitnet={which!r}: use 'ffn', 'all_but_attention' or 'all'")
    for block in model.blocks:
        block = getattr(block, "block", block)  # a MoD wraps its Block (mod.py)
        _swap(block.ffn)
        if which == "all" or (which == "all_but_attention" and isinstance(block.mixer, Mamba2)):
            _swap(block.mixer)
    return model


# ------------------------------------------------------------------------------------------------
# Packing: 2 bits per weight, 4 weights per byte

SHIFTS = (0, 2, 4, 6)


def pack_ternary(w_q):
    """w_q (N, K) with values in {-1, 0, 1} -> (N, ceil(K / 4)) uint8."""
    codes = (w_q + 1).to(torch.uint8)  # (N, K) in {0, 1, 2}
    codes = F.pad(codes, (0, -codes.shape[1] % 4), value=1)  # (N, 4 ceil(K/4)): padding = weight 0
    codes = codes.view(codes.shape[0], -1, 4)  # (N, K/4, 4)
    return codes[..., 0] | codes[..., 1] << 2 | codes[..., 2] << 4 | codes[..., 3] << 6


def unpack_ternary(packed, in_features):
    """packed (N, K/4) uint8 -> w_q (N, in_features) int8 in {-1, 0, 1}."""
    shifts = torch.tensor(SHIFTS, dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3  # (N, K/4, 4)
    return codes.view(packed.shape[0], -1)[:, :in_features].to(torch.int8) - 1  # (N, K)


# ------------------------------------------------------------------------------------------------
# The integer matmul

def int_matmul_reference(a, w):
    """a (M, K) int8, w (N, K) int8 -> a w^T (M, N) int32, as an int32 matmul (any device that has
    one; the CPU's is the reference)."""
    return a.to(torch.int32) @ w.to(torch.int32).T


def int_matmul_cuda(a, w):
    """The same product through torch._int_mm (cuBLASLt int8 GEMM). It needs M > 16 and K, N
    multiples of 8; M is padded too, to a multiple of 8 and at least 32 (cuBLASLt has returned wrong
    int8 results at M = 17, pytorch issue 107671). Zero rows and columns add nothing; the result is
    cut back. w.T is column-major, the layout the int8 GEMM wants for its second operand."""
    M, K = a.shape
    N = w.shape[0]
    pad_m, pad_k, pad_n = max(32, -(-M // 8) * 8) - M, -K % 8, -N % 8
    if pad_m or pad_k:
        a = F.pad(a, (0, pad_k, 0, pad_m))  # (M', K')
    if pad_k or pad_n:
        w = F.pad(w, (0, pad_k, 0, pad_n))  # (N', K')
    return torch._int_mm(a, w.T)[:M, :N]  # (M, N) int32


def int_matmul(a, w):
    """a (M, K) int8, w (N, K) int8 -> a w^T (M, N) int32, exact: _int_mm on a CUDA GPU, else the
    reference."""
    return int_matmul_cuda(a, w) if a.is_cuda else int_matmul_reference(a, w)


# ------------------------------------------------------------------------------------------------
# Inference: PackedBitLinear

class PackedBitLinear(nn.Module):
    """A BitLinear after export: packed ternary weights (uint8 buffer), β, the norm and the bias.
    forward(x) is the integer path: y = int_matmul(x_q, W_q) β / s_x + b."""

    def __init__(self, in_features, out_features, bias=True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.norm = nn.RMSNorm(in_features, eps=1e-6, device=device)
        self.register_buffer("packed", torch.zeros(out_features, -(-in_features // 4), dtype=torch.uint8,
                                                   device=device))  # (N, ceil(K/4))
        self.register_buffer("scale", torch.ones((), device=device))  # β
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_bitlinear(cls, layer):
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, device=layer.weight.device)
        w_q, beta = ternary(layer.weight)
        new.packed.copy_(pack_ternary(w_q))
        new.scale.copy_(beta)
        new.norm.load_state_dict(layer.norm.state_dict())
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
        return new

    def forward(self, x):
        shape = x.shape  # (..., K)
        x_q, s = absmax_int8(self.norm(x).reshape(-1, self.in_features))  # (M, K), (M, 1)
        w_q = unpack_ternary(self.packed, self.in_features)  # (N, K) int8
        acc = int_matmul(x_q.to(torch.int8), w_q)  # (M, N) int32, exact
        y = acc.float() * (self.scale.float() / s)  # (M, N)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype).view(*shape[:-1], self.out_features)  # (..., N)


def pack(model):
    """Replace, in place, every BitLinear of model by its PackedBitLinear; returns model."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, BitLinear):
                setattr(module, name, PackedBitLinear.from_bitlinear(child))
    return model


def bitlinear_bytes(model):
    """(bytes of the packed layers' tensors, bytes the same layers take in bf16), over the
    PackedBitLinear modules of a packed model: the measure of the >= 7x claim."""
    packed = bf16 = 0
    for m in model.modules():
        if isinstance(m, PackedBitLinear):
            packed += sum(t.numel() * t.element_size() for t in m.state_dict().values())
            vectors = m.in_features + (m.out_features if m.bias is not None else 0)  # norm gain, bias
            bf16 += 2 * (m.in_features * m.out_features + vectors)
    return packed, bf16


# ------------------------------------------------------------------------------------------------
# Export: python -m gpt.bitnet out/run

def export(src, dst=None):
    """Pack the BitLinear layers of the checkpoint src (a run folder or a .pt file) into dst
    (default: packed.pt beside it). Returns (dst, packed bytes, bf16 bytes) of those layers."""
    from gpt.model import GPT  # here: model.py imports this file

    path = src if src.endswith(".pt") else os.path.join(src, "ckpt.pt")
    dst = dst or os.path.join(os.path.dirname(path), "packed.pt")
    ckpt = checkpoint.load(path)
    config = checkpoint.model_config(ckpt)
    if ckpt.get("bitnet_packed"):
        raise ValueError(f"{path} is already packed")
    if config.bitnet == "none":
        raise ValueError(f"{path} was trained with bitnet='none': it has no ternary layers to pack; "
                         f"train with --bitnet all_but_attention (or ffn, all)")
    model = GPT(config)
    model.load_state_dict(ckpt["model"])
    pack(model)
    checkpoint.save(dst, {"model": model.state_dict(), "model_config": ckpt["model_config"],
                          "tokenizer": ckpt["tokenizer"], "step": ckpt.get("step"), "bitnet_packed": True})
    return (dst, *bitlinear_bytes(model))


def main(argv=None):
    p = argparse.ArgumentParser(description="Pack a BitNet run's ternary layers: 2 bits per weight.")
    p.add_argument("src", help="run folder holding ckpt.pt, or a checkpoint file")
    p.add_argument("--out", help="where to write (default: packed.pt beside the checkpoint)")
    a = p.parse_args(argv)
    try:
        dst, packed, bf16 = export(a.src, a.out)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    mib = 2 ** 20
    print(f"wrote {dst} ({os.path.getsize(dst) / mib:.2f} MiB); ternary layers {packed / mib:.2f} MiB "
          f"packed vs {bf16 / mib:.2f} MiB in bf16 ({bf16 / packed:.1f}x smaller). "
          f"Sample: python sampling.py --out_dir {dst}")


if __name__ == "__main__":  # run as gpt.bitnet, not __main__, so its classes are the ones gpt.model uses
    from gpt.bitnet import main as package_main

    package_main()
