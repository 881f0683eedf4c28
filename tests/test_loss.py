"""The fused head + cross-entropy (gpt/loss.py) against the reference on full logits."""

import pytest
import torch

from conftest import tiny_config
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
def test_fused_loss_compiled_bf16_matches_full_on_gpu(fresh_compile):
    """torch.compile through the autograd.Function, bf16 autocast, GPT-2's vocabulary (2 chunks)."""
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
