"""The fused head + cross-entropy (gpt/loss.py) against the reference on full logits."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, hopper_build, tiny_config
from gpt import loss as loss_py
from gpt.loss import cross_entropy, linear_cross_entropy
from gpt.model import GPT


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(loss_py, "CHUNK_ELEMENTS", 97 * 64)  # 64-row chunks: several per call


def _inputs(n=300, c=32, v=97):
    x = torch.randn(n, c, dtype=torch.float64, requires_grad=True)
    w = torch.randn(v, c, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, v, (n,))
    t[::7] = -1  # ignored positions
    return x, w, t


def test_fused_loss_and_grads_equal_reference(small_chunks):
    x, w, t = _inputs()
    ref = cross_entropy(x @ w.T, t)
    gx, gw = torch.autograd.grad(ref, (x, w))
    out = linear_cross_entropy(x, w, t)
    fx, fw = torch.autograd.grad(out * 3.0, (x, w))  # an upstream gradient scales both
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fx, 3.0 * gx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fw, 3.0 * gw, rtol=1e-10, atol=1e-12)


def test_fused_loss_without_grad_equals_reference(small_chunks):
    x, w, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t), cross_entropy(x @ w.T, t))


@pytest.mark.parametrize("tie", [True, False])
def test_model_fused_loss_matches_full(tie):
    idx = torch.randint(0, 64, (3, 32))
    targets = idx.roll(-1, dims=1)
    targets[:, -1] = -1
    results = []
    for kind in ("full", "fused"):
        torch.manual_seed(0)
        model = GPT(tiny_config(loss=kind, tie_weights=tie))
        logits, loss = model(idx, targets)
        loss.backward()
        results.append((logits, loss, {n: p.grad for n, p in model.named_parameters()}))
    (logits_full, loss_full, g_full), (logits_fused, loss_fused, g_fused) = results
    assert logits_full.shape == (3, 32, 64) and logits_fused is None
    torch.testing.assert_close(loss_fused, loss_full)
    assert g_full.keys() == g_fused.keys()
    for name in g_full:
        torch.testing.assert_close(g_fused[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kernel", [False, True], ids=["torch", "triton"])
def test_fused_loss_compiled_bf16_matches_full_on_gpu(kernel, fresh_compile, monkeypatch):
    """torch.compile through the autograd.Function, bf16 autocast, GPT-2's vocabulary (2 chunks),
    with the chunk's middle in PyTorch and as the Triton kernel."""
    monkeypatch.setattr(loss_py, "TRITON", kernel)
    idx = torch.randint(0, 50257, (4, 1024), device="cuda")
    out = {}
    for kind in ("full", "fused"):
        torch.manual_seed(0)
        model = GPT(tiny_config(loss=kind, vocab_size=50304, block_size=1024)).cuda()
        run = torch.compile(model) if kind == "fused" else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = run(idx, idx.roll(-1, dims=1))
        loss.backward()
        out[kind] = (loss.detach(), model.wte.weight.grad, model.blocks[0].mixer.c_attn.weight.grad)
    (loss_full, *g_full), (loss_fused, *g_fused) = out["full"], out["fused"]
    torch.testing.assert_close(loss_fused, loss_full, rtol=1e-3, atol=1e-3)
    for a, b in zip(g_fused, g_full):
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.999, cos


# ----------------------------------------------------------------------------------------------
# The Triton kernel of the chunk's elementwise middle (loss._ce_kernel)

INTERPRETED = """
import torch
import torch.nn.functional as F
from gpt import loss as loss_py
from gpt.loss import _ce_rows_reference, _ce_rows_triton, cross_entropy, linear_cross_entropy

torch.set_num_threads(1)
torch.manual_seed(0)
loss_py.CE_BLOCK = 128  # 3 blocks over V = 300, the last one partial (44 columns)
loss_py.CHUNK_ELEMENTS = 300 * 16  # 16-row chunks: several per call
n, c, v = 40, 16, 300
assert loss_py._kernel_applies(torch.zeros(n, v))  # the interpreter runs the kernel on CPU tensors

# the kernel against the PyTorch formulas: lse, loss term, gradient
z = 4 * torch.randn(n, v)
t = torch.randint(0, v, (n,))
t[::5] = -1  # ignored rows
t[1], t[2], t[3] = v - 1, 256, 0  # targets in the last, partial block and at both ends
loss, g = _ce_rows_triton(z.clone(), t, grad=True)
lse = torch.logsumexp(z, dim=-1)
valid = t != -1
z_y = z.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
torch.testing.assert_close(loss[valid] + z_y[valid], lse[valid], rtol=1e-6, atol=1e-6)  # lse
torch.testing.assert_close(loss, torch.where(valid, lse - z_y, 0.0), rtol=1e-6, atol=1e-6)
expect = torch.softmax(z, dim=-1) - F.one_hot(t.clamp(min=0), v) * 1.0
torch.testing.assert_close(g, torch.where(valid[:, None], expect, 0.0), rtol=1e-5, atol=1e-7)
ref_loss, ref_g = _ce_rows_reference(z, t, grad=True)
torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
torch.testing.assert_close(g, ref_g, rtol=1e-5, atol=1e-7)
loss_only, none = _ce_rows_triton(z, t, grad=False)
assert none is None and torch.equal(loss_only, loss)

# the whole fused loss through the kernel against cross-entropy of the full logits
x = torch.randn(n, c, requires_grad=True)
w = torch.randn(v, c, requires_grad=True)
ref = cross_entropy(x @ w.T, t)
gx, gw = torch.autograd.grad(ref, (x, w))
out = linear_cross_entropy(x, w, t)
fx, fw = torch.autograd.grad(out * 3.0, (x, w))
torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
torch.testing.assert_close(fx, 3.0 * gx, rtol=1e-5, atol=1e-6)
torch.testing.assert_close(fw, 3.0 * gw, rtol=1e-5, atol=1e-6)
with torch.no_grad():
    torch.testing.assert_close(linear_cross_entropy(x, w, t), ref, rtol=1e-6, atol=1e-6)
nothing = torch.full_like(t, -1)
assert linear_cross_entropy(x, w, nothing).isnan()  # every target ignored: nan, as F.cross_entropy
print("ok")
"""


def test_kernel_under_interpreter_equals_reference():
    """The kernel, run on the CPU by Triton's interpreter (fp32): its loss terms and gradient equal
    the formulas, and the fused loss through it equals cross_entropy on the full logits. In a fresh
    process, since TRITON_INTERPRET is read when triton is imported."""
    pytest.importorskip("triton")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(INTERPRETED)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("grad", [True, False])
def test_kernel_builds_for_hopper_without_spills(grad):
    """The configuration the GPU runs (CE_BLOCK, CE_WARPS) with bf16 logits of GPT-2's vocabulary,
    built for sm_90a: no register spills (40 registers a thread with grad, as of triton 3.6)."""
    pytest.importorskip("triton")
    signature = {"z_ptr": "*bf16", "targets_ptr": "*i64", "loss_ptr": "*fp32", "stride": "i32"}
    registers, spilled = hopper_build(loss_py._ce_kernel, signature,
                                      {"V": 50304, "BLOCK": loss_py.CE_BLOCK, "GRAD": grad},
                                      num_warps=loss_py.CE_WARPS, aligned=tuple(signature))
    print(f"_ce_kernel grad={grad}: {registers} registers, {spilled} bytes spilled")
    assert spilled == 0 and registers <= 128, (registers, spilled)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_path_matches_reference_path_on_gpu(dtype, full_fp32, triton_kernels, monkeypatch):
    """GPT-2's shape (2 chunks of 4096 positions, C = 768, V = 50304), some targets ignored: the
    fused loss through the kernel against the same loop through the PyTorch reference."""
    N, C, V = 4096, 768, 50304
    x = torch.randn(N, C, device="cuda", dtype=dtype, requires_grad=True)
    w = (0.1 * torch.randn(V, C, device="cuda", dtype=dtype)).requires_grad_()  # logits of std ~2.8
    t = torch.randint(0, V, (N,), device="cuda")
    t[::9] = -1
    t[1] = V - 1  # a target in the last, partial block
    assert loss_py._kernel_applies(torch.empty(1, 1, device="cuda", dtype=dtype))

    def fused():
        loss = linear_cross_entropy(x, w, t)
        return (loss.detach(), *torch.autograd.grad(loss, (x, w)))

    kernel = fused()
    with torch.no_grad():
        kernel_eval = linear_cross_entropy(x, w, t)
    monkeypatch.setattr(loss_py, "_kernel_applies", lambda z: False)
    reference = fused()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16: one rounding of the gradient either way
    torch.testing.assert_close(kernel[0], reference[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel_eval, reference[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(kernel[1:], reference[1:]):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < tol, err
