"""Mamba-2 (gpt/mamba.py): the chunked scan against the token-by-token recurrence, state carrying,
the Triton kernels of chunk_output against its reference (on the CPU under Triton's interpreter, and
built for the H100), cached decoding of pure-Mamba and hybrid models against the full forward,
causality, the parameter and FLOP counts, and (on a GPU) the kernels and the compiled bf16 path
against the fp32 reference."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import ROOT, hopper_build, tiny_config
from gpt.config import LAYER_LETTERS, GPTConfig
from gpt.generate import generate
from gpt import mamba
from gpt.mamba import Mamba2, MambaCache, chunk_output, segsum, ssd_chunked, ssd_recurrent
from gpt.model import GPT


# Mamba sizes for the tiny test models: n_embd 32, expand 2 -> d_inner 64 = 4 heads of 16.
MAMBA = dict(mamba_d_state=8, mamba_head_dim=16, mamba_chunk_size=8)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def scan_inputs(b=2, T=37, h=4, P=8, g=2, N=16, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, T, h, P, dtype=dtype, generator=gen)
    dt = F.softplus(torch.randn(b, T, h, dtype=dtype, generator=gen) - 1)
    A = -torch.empty(h, dtype=dtype).uniform_(1, 16, generator=gen)  # Mamba-2's init range
    B = torch.randn(b, T, g, N, dtype=dtype, generator=gen)
    C = torch.randn(b, T, g, N, dtype=dtype, generator=gen)
    h0 = torch.randn(b, h, P, N, dtype=dtype, generator=gen)
    return x, dt, A, B, C, h0


def mamba_model(layers="M", **kw):
    return GPT(tiny_config(layers=layers, **{**MAMBA, **kw})).double().eval()


def hybrid_patterns():
    out = ["M", "MG", "GM"]
    if "L" in LAYER_LETTERS:  # local attention (the attention family's letter), when it exists
        out.append("ML")
    return out


def local_kw(layers):
    return {"window": 8} if "L" in layers else {}


# ------------------------------------------------------------------------------------------------
# The scan

def test_segsum():
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    inf = float("-inf")
    want = torch.tensor([[0, inf, inf], [2, 0, inf], [5, 3, 0]], dtype=torch.float64)
    assert torch.equal(segsum(a), want)


@pytest.mark.parametrize("chunk", [1, 4, 8, 16, 37, 64])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_chunked_equals_recurrence(chunk, groups):
    """fp64: the chunked dual form is the recurrence, for any chunk size (also one that does not
    divide T, and one longer than T), any grouping of B and C, and a nonzero initial state."""
    x, dt, A, B, C, h0 = scan_inputs(g=groups)
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, h0)
    y, s = ssd_chunked(x, dt, A, B, C, chunk, h0)
    assert rel(y, y_ref) < 1e-10
    assert rel(s, s_ref) < 1e-10


def test_chunk_size_does_not_matter():
    x, dt, A, B, C, _ = scan_inputs(T=64)
    y8, s8 = ssd_chunked(x, dt, A, B, C, 8)
    for chunk in (2, 16, 64):
        y, s = ssd_chunked(x, dt, A, B, C, chunk)
        assert rel(y, y8) < 1e-12 and rel(s, s8) < 1e-12


def test_long_sequence_precision():
    """Strong decay over many chunks: the across-chunk decays are summed directly (segsum), so
    nothing overflows or loses precision (a difference of cumulative sums would reach ~1e4)."""
    x, dt, A, B, C, _ = scan_inputs(b=1, T=1024, h=2, P=4, g=1, N=4)
    dt = dt + 0.5  # total log-decay of order -1e4 over the sequence
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C)
    y, s = ssd_chunked(x, dt, A, B, C, 16)
    assert torch.isfinite(y).all()
    assert rel(y, y_ref) < 1e-10 and rel(s, s_ref) < 1e-10


def test_two_halves_carry_the_state():
    x, dt, A, B, C, _ = scan_inputs(T=40)
    y, s = ssd_chunked(x, dt, A, B, C, 8)
    y1, s1 = ssd_chunked(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 8)
    y2, s2 = ssd_chunked(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 8, initial_state=s1)
    assert rel(torch.cat([y1, y2], dim=1), y) < 1e-12
    assert rel(s2, s) < 1e-12


def chunk_inputs(b=2, c=3, Q=24, g=2, r=2, P=8, N=16, dtype=torch.float64, device="cpu", seed=0):
    """chunk_output's inputs, leaves that require grad: a_cum (b, c, h, Q) fp32 (fp64 with fp64) of
    log-decays as the layer makes them (down to about -Q / 10 at the chunk's end), C, B, xdt, H."""
    gen = torch.Generator().manual_seed(seed)
    a_cum = (-0.2 * torch.rand(b, c, g * r, Q, generator=gen, dtype=torch.float64)).cumsum(-1)
    C, B = (torch.randn(b, c, Q, g, N, generator=gen, dtype=torch.float64) for _ in range(2))
    xdt = torch.randn(b, c, Q, g, r, P, generator=gen, dtype=torch.float64)
    H = torch.randn(b, c, g, r, P, N, generator=gen, dtype=torch.float64)
    a_dtype = torch.promote_types(dtype, torch.float32)
    return [t.to(device, a_dtype if t is a_cum else dtype).requires_grad_() for t in (a_cum, C, B, xdt, H)]


def test_chunk_output_is_the_sum_it_names():
    """y[l] = sum_{s <= l} exp(a_cum[l] - a_cum[s]) (C_l . B_s) xdt_s + exp(a_cum[l]) H C_l, summed
    token by token."""
    a_cum, C, B, xdt, H = chunk_inputs()
    y = chunk_output(a_cum, C, B, xdt, H)  # (b, c, Q, g, r, P)
    b, c, Q, g, r, P = xdt.shape
    a = a_cum.view(b, c, g, r, Q)
    want = torch.zeros_like(y)
    for l in range(Q):
        want[:, :, l] = torch.exp(a[..., l])[..., None] * torch.einsum("bcgrpn,bcgn->bcgrp", H, C[:, :, l])
        for s in range(l + 1):
            CB = (C[:, :, l] * B[:, :, s]).sum(-1)  # (b, c, g)
            decay = torch.exp(a[..., l] - a[..., s])  # (b, c, g, r)
            want[:, :, l] += (decay * CB[..., None])[..., None] * xdt[:, :, s]
    assert rel(y, want) < 1e-12


# Triton 3.6's interpreter turns a loop bound computed from program_id into an int with int() of a
# one-element array, which NumPy >= 2.4 refuses; this shim reads the element instead.
INTERPRETER_SHIM = """
import triton.runtime.interpreter as interpreter
patch_tensor = interpreter._patch_lang_tensor
def patched(tensor, scope):
    patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))
interpreter._patch_lang_tensor = patched
"""

INTERPRETER_CHECK = """
import sys
import torch
sys.path.insert(0, "tests")  # conftest, which test_mamba imports
from gpt import mamba
from test_mamba import chunk_inputs, rel, scan_inputs
assert mamba.use_triton(torch.zeros(1))  # CPU tensors take the kernels under the interpreter
# Q = 80: two forward tiles of 64 and three backward tiles of 32, the last ones partial; Q = 24: one
# partial tile; g < h and g = 1
for shape in [dict(b=1, c=2, Q=80, g=2, r=2, P=8, N=16), dict(b=2, c=1, Q=24, g=1, r=3, P=16, N=32)]:
    inputs = chunk_inputs(**shape, dtype=torch.float32)
    y_ref = mamba.chunk_output(*inputs)
    dy = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, inputs, dy)
    y = mamba.ChunkOutput.apply(*inputs)
    grads = torch.autograd.grad(y, inputs, dy)
    assert rel(y, y_ref) < 1e-6, (shape, rel(y, y_ref))
    for name, g, g_ref in zip(["a_cum", "C", "B", "xdt", "H"], grads, grads_ref):
        assert rel(g, g_ref) < 1e-6, (shape, name, rel(g, g_ref))
# the whole scan on the kernels, with a padded last chunk (T = 150, Q = 48), g < h and an initial
# state, against the fp64 recurrence, values and gradients of every input
inputs = [t.requires_grad_() for t in scan_inputs(b=1, T=150, h=4, P=8, g=2, N=16)]
y_ref, s_ref = mamba.ssd_recurrent(*inputs[:5], inputs[5])
dy, ds = torch.randn_like(y_ref), torch.randn_like(s_ref)
grads_ref = torch.autograd.grad((y_ref * dy).sum() + (s_ref * ds).sum(), inputs)
inputs32 = [t.detach().float().requires_grad_() for t in inputs]
y, s = mamba.ssd_chunked(*inputs32[:5], 48, inputs32[5])
grads = torch.autograd.grad((y * dy.float()).sum() + (s * ds.float()).sum(), inputs32)
assert rel(y.double(), y_ref) < 1e-5 and rel(s.double(), s_ref) < 1e-5, (rel(y.double(), y_ref), rel(s.double(), s_ref))
# A's gradient sums d a_cum over every token of a head, with cancellation: the fp32 reference's is
# off by 5e-6, the kernels' by 2e-5
for name, g, g_ref in zip(["x", "dt", "A", "B", "C", "h0"], grads, grads_ref):
    assert rel(g.double(), g_ref) < (1e-4 if name == "A" else 1e-5), (name, rel(g.double(), g_ref))
print("ok")
"""


def test_triton_kernels_under_interpreter():
    """The Triton kernels of ChunkOutput, run on the CPU by Triton's interpreter (fp32: its bf16
    tl.dot is broken), against the reference chunk_output: the output and all five gradients, then
    the whole scan against the recurrence. TRITON_INTERPRET must be set before Triton is imported,
    hence a fresh process."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETER_SHIM + INTERPRETER_CHECK], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


FP32_POINTERS = {"a_ptr", "dC_ptr", "dB_ptr", "da_ptr"}  # a_cum, its gradient, the group's gradient buffers


@pytest.mark.parametrize("name", ["_chunk_output_fwd", "_chunk_output_bwd_rows", "_chunk_output_bwd_cols",
                                  "_chunk_output_bwd_dh"])
def test_triton_kernels_build_for_hopper_without_spills(name):
    """Each kernel compiles for the H100 (sm_90a) in bf16 at the bench shape's configuration
    (Q = 128, N = 128, P = 64) and keeps everything in registers (0 bytes spilled)."""
    pytest.importorskip("triton")
    kernel = getattr(mamba, name)
    config = mamba.chunk_output_config(kernel, 128, 128, 64)
    num_warps = config.pop("num_warps")
    signature = {arg: ("*fp32" if arg in FP32_POINTERS else "*bf16") if arg.endswith("_ptr") else "i32"
                 for arg in kernel.arg_names if arg not in config}
    pointers = tuple(arg for arg in signature if arg.endswith("_ptr"))  # torch's allocations: 16-byte aligned
    registers, spilled = hopper_build(kernel, signature, config, num_warps, aligned=pointers)
    print(f"{name}: {registers} registers, {spilled} bytes spilled")
    assert spilled == 0, (name, registers, spilled)


# ------------------------------------------------------------------------------------------------
# The layer

def test_layer_two_halves_with_cache():
    """The layer run in two calls carrying a MambaCache (conv window + SSM state) equals one call."""
    torch.manual_seed(0)
    layer = Mamba2(tiny_config(layers="M", **MAMBA)).double()
    u = torch.randn(2, 23, 32, dtype=torch.float64)
    y = layer(u, None)
    cache = layer.new_cache(2, 32, u.device, u.dtype)
    y1 = layer(u[:, :10], None, cache)
    y2 = layer(u[:, 10:], None, cache)
    assert rel(torch.cat([y1, y2], dim=1), y) < 1e-12


@pytest.mark.parametrize("layers", hybrid_patterns())
def test_decoding_equals_full_forward(layers):
    """Token-by-token decoding (T = 1 steps) and multi-token continuations with the cache give the
    full forward's logits, for pure-Mamba and hybrid stacks."""
    model = mamba_model(layers, n_layer=2, **local_kw(layers))
    idx = torch.randint(0, 64, (2, 30))
    full, _ = model(idx, targets=idx)  # (2, 30, V)

    cache = model.new_cache(2)
    steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(30)]
    assert rel(torch.cat(steps, dim=1), full) < 1e-10

    cache = model.new_cache(2)  # prefill 11 tokens, then continue by 1, 7 and 11 (chunked prefills)
    for a, b in [(0, 11), (11, 12), (12, 19), (19, 30)]:
        logits, _ = model(idx[:, a:b], cache=cache)  # (2, 1, V): the last position's
        assert rel(logits[:, -1], full[:, b - 1]) < 1e-10


def test_jamba_decoding_equals_full_forward():
    """Jamba's pattern (arXiv 2403.19887): one attention layer in eight, MoE on every other layer.
    The MoE router scores in fp32 (moe.py), hence the looser tolerance than the fp64 tests above."""
    model = mamba_model("MMMGMMMM", n_layer=8, ffn="moe", moe_every=2, n_expert=4, n_expert_active=2)
    assert [type(b.mixer).__name__ for b in model.blocks].count("Mamba2") == 7
    idx = torch.randint(0, 64, (2, 12))
    full, _ = model(idx, targets=idx)
    cache = model.new_cache(2)
    steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(12)]
    assert rel(torch.cat(steps, dim=1), full) < 1e-6


@pytest.mark.parametrize("layers", hybrid_patterns())
def test_causal(layers):
    """Changing tokens from position t on changes no output before t."""
    model = mamba_model(layers, n_layer=2, **local_kw(layers))
    idx = torch.randint(0, 64, (1, 32))
    other = idx.clone()
    other[:, 20:] = (other[:, 20:] + 1) % 64
    a, _ = model(idx, targets=idx)
    b, _ = model(other, targets=other)
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_generate_greedy_same_with_and_without_cache():
    """generate() with the Mamba caches (including the refill when the window slides past
    block_size) gives the tokens of the uncached loop."""
    model = mamba_model("MG", n_layer=2)
    idx = torch.randint(0, 64, (2, 5))
    cached = generate(model, idx, 32, temperature=0, use_cache=True)  # 37 > block_size 32: slides
    plain = generate(model, idx, 32, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)


def test_cache_is_fixed_size():
    layer = Mamba2(tiny_config(layers="M", **MAMBA))
    small, large = layer.new_cache(3, 16, "cpu", torch.float32), layer.new_cache(3, 4096, "cpu", torch.float32)
    assert isinstance(small, MambaCache) and small.nbytes() == large.nbytes()
    # conv window (d_conv - 1 inputs of d_inner + 2 g N channels) + fp32 state (h P N = d_inner N)
    assert small.nbytes() == 3 * 4 * ((64 + 2 * 8) * 3 + 64 * 8)
    # the state stays fp32 when the model is bf16
    assert layer.new_cache(1, 16, "cpu", torch.bfloat16).ssm.dtype == torch.float32


# ------------------------------------------------------------------------------------------------
# Counting and config

@pytest.mark.parametrize("bias", [False, True])
def test_param_count_closed_form(bias):
    cfg = tiny_config(layers="M", bias=bias, mamba_n_groups=2, **MAMBA)
    layer = Mamba2(cfg)
    C, d, N, g, K, h = 32, 64, 8, 2, 4, 4
    proj_in = 2 * d + 2 * g * N + h  # z, x, B, C, dt
    conv_dim = d + 2 * g * N
    want = (C * proj_in + bias * proj_in  # in_proj
            + conv_dim * K + conv_dim  # depthwise conv weights and bias
            + 3 * h  # dt_bias, A_log, D
            + d  # gated RMSNorm gain
            + d * C + bias * C)  # out_proj
    assert sum(p.numel() for p in layer.parameters()) == want


def test_flops_per_token_matches_counted_matmuls():
    """FLOPs that torch's FlopCounterMode counts in one forward of the layer (matmuls and einsums)
    equal flops_per_token / 3, once the (c+1)^2 matrix form of the across-chunk recurrence replaces
    the algorithm's one update per chunk, and less the conv (2 per weight and token), which the
    layer computes as shifted multiply-adds that the counter does not see."""
    cfg = tiny_config(layers="M", **{**MAMBA, "mamba_chunk_size": 16})
    layer = Mamba2(cfg)
    b, T = 2, 64
    with FlopCounterMode(display=False) as counter:
        layer(torch.randn(b, T, 32), None)
    d, N, Q = 64, 8, 16
    c = T // Q
    algorithm = 2 * N * d / Q
    matrix_form = 2 * N * d * (c + 1) ** 2 / T
    conv = 2 * layer.conv1d.weight.numel()
    assert counter.get_total_flops() / (b * T) == pytest.approx(
        layer.flops_per_token(T) / 3 - algorithm + matrix_form - conv)


def test_model_counts_include_mamba():
    model = GPT(tiny_config(layers="MG", **MAMBA))
    m = model.blocks[0]
    assert model.flops_per_token(32) == 6 * model.lm_head.weight.numel() + sum(
        blk.mixer.flops_per_token(32) + blk.ffn.flops_per_token(32) for blk in model.blocks)
    assert m.mixer.flops_per_token(32) > 6 * m.mixer.in_proj.weight.numel()


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="mamba_head_dim"):
        GPTConfig(n_embd=48, n_head=4, layers="M", mamba_head_dim=64)
    with pytest.raises(ValueError, match="mamba_n_groups"):
        GPTConfig(n_embd=64, n_head=4, layers="MG", mamba_head_dim=32, mamba_n_groups=3)
    GPTConfig(n_embd=48, n_head=4, layers="G", mamba_head_dim=64)  # no M layer: not checked
    with pytest.raises(ValueError, match="letters"):
        GPTConfig(layers="MX")


def test_trains():
    """A few optimizer steps on a fixed batch lower the loss of a hybrid (gradients flow through the
    scan, the conv and the gate)."""
    model = GPT(tiny_config(layers="MG", **MAMBA))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, y = torch.randint(0, 64, (4, 32)), torch.randint(0, 64, (4, 32))
    losses = []
    for _ in range(20):
        _, loss = model(x, targets=y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "triton"])
def test_gpu_compiled_bf16_matches_fp32_reference(kernels, fresh_compile, monkeypatch):
    """The path training uses on a GPU (torch.compile'd ssd_chunked under bf16 autocast, its
    chunk_output in PyTorch or as ChunkOutput's Triton kernels; mamba-ssm's kernel when it imports)
    against the fp32 eager reference, scan and whole layer."""
    monkeypatch.setattr(mamba, "TRITON", kernels)
    torch.manual_seed(0)
    x, dt, A, B, C, h0 = (t.cuda() for t in scan_inputs(b=2, T=300, h=8, P=64, g=1, N=128,
                                                           dtype=torch.float32))
    dt = dt * 0.1
    y_ref, s_ref = ssd_chunked(x, dt, A, B, C, 64, h0)
    scan = torch.compile(ssd_chunked)
    y, s = scan(x.bfloat16(), dt, A, B.bfloat16(), C.bfloat16(), 64, h0)
    assert y.dtype == torch.bfloat16
    assert rel(y.float(), y_ref) < 1e-2 and rel(s.float(), s_ref) < 1e-2  # CPU bf16: 4.5e-3, 3.9e-3

    cfg = GPTConfig(vocab_size=256, block_size=512, n_layer=2, n_head=4, n_embd=256, layers="MG",
                    mamba_chunk_size=64)
    model = GPT(cfg).cuda()
    idx = torch.randint(0, 256, (2, 512), device="cuda")
    ref, _ = model(idx, targets=idx)
    compiled = torch.compile(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, loss = compiled(idx, targets=idx)
    assert rel(got.float(), ref) < 1e-2  # CPU eager bf16: 6.9e-3
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [dict(b=2, c=3, Q=24, g=2, r=2, P=8, N=16),
                                   dict(b=1, c=4, Q=80, g=2, r=3, P=64, N=64),
                                   dict(b=2, c=64, Q=128, g=1, r=24, P=64, N=128)],  # the bench shape, T = 8192
                         ids=["small", "Q80", "bench"])
def test_gpu_chunk_output_kernels_match_reference(shape, dtype, full_fp32, triton_kernels):
    """ChunkOutput's Triton kernels on the GPU (the path ssd_chunked takes there) against the fp32
    reference chunk_output on the same values: the output and all five gradients. fp32 multiplies
    exactly in both; bf16 rounds the kernels' inputs to their tensor-core products."""
    pytest.importorskip("triton")
    inputs = chunk_inputs(**shape, dtype=dtype, device="cuda")
    assert mamba.use_triton(inputs[3])
    ref_inputs = [t.detach().float().requires_grad_() for t in inputs]
    y_ref = chunk_output(*ref_inputs)  # (b, c, Q, g, r, P)
    dy = torch.randn_like(y_ref)
    grads_ref = torch.autograd.grad(y_ref, ref_inputs, dy)
    y = mamba.ChunkOutput.apply(*inputs)
    grads = torch.autograd.grad(y, inputs, dy.to(dtype))
    assert y.dtype == dtype and all(g.dtype == t.dtype for g, t in zip(grads, inputs))
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the bf16 reference on the CPU: 2.8e-3 to 3.7e-3
    assert rel(y.float(), y_ref) < tol
    for name, g, g_ref in zip(["a_cum", "C", "B", "xdt", "H"], grads, grads_ref):
        assert rel(g.float(), g_ref) < tol, (name, rel(g.float(), g_ref))
