"""Attention: attend() against a hand-written reference, GQA/MQA head mapping and cache size,
sliding-window kernels (every path against the explicit-mask reference, ring-buffer cache, decoding
past the window edge), cross-layer KV sharing, and all of them together with RoPE."""

import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, tiny_config
from gpt import attention
from gpt.attention import (CausalSelfAttention, RingKVCache, attend, flex_window, kv_owners, local_attend,
                           visible, window_block_mask)
from gpt.config import GPTConfig
from gpt.model import GPT

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reference(q, k, v, window=None, q_pos=None, k_pos=None):
    """Attention written out: fp64 scores, query head h reads KV head h // (nh // nkv), key j visible
    to query i iff j <= i (and j > i - window)."""
    B, nh, T, hs = q.shape
    nkv, S = k.shape[1], k.shape[2]
    q_pos = torch.arange(T) if q_pos is None else q_pos
    k_pos = torch.arange(S) if k_pos is None else k_pos
    ok = (k_pos[None, :] <= q_pos[:, None])
    if window is not None:
        ok &= k_pos[None, :] > q_pos[:, None] - window
    out = torch.empty(B, nh, T, hs, dtype=torch.float64)
    for h in range(nh):
        g = h // (nh // nkv)
        s = q[:, h].double() @ k[:, g].double().transpose(-2, -1) / math.sqrt(hs)  # (B, T, S)
        s = s.masked_fill(~ok.to(s.device), float("-inf"))
        out[:, h] = (s.softmax(-1) @ v[:, g].double()).cpu()
    return out


def qkv(B=2, nh=4, nkv=2, T=37, hs=16, dtype=torch.float32, device="cpu", grad=False):
    g = torch.Generator().manual_seed(0)
    make = lambda n: torch.randn(B, n, T, hs, generator=g).to(device, dtype).requires_grad_(grad)  # noqa: E731
    return make(nh), make(nkv), make(nkv)


def close(a, b, tol):
    """Relative error ||a - b|| / ||b|| below tol (||b|| floored at 0.1 RMS: a gradient that is
    zero, as q's and k's are with window 1, is compared absolutely)."""
    a, b = a.double().cpu(), b.double().cpu()
    err = ((a - b).norm() / max(b.norm().item(), 0.1 * b.numel() ** 0.5)).item()
    assert err < tol, f"relative error {err:.2e} >= {tol:.0e}"


# ------------------------------------------------------------------------------------------------
# attend(): global, explicit positions, GQA head mapping

def test_attend_global_matches_reference():
    for nkv in (4, 2, 1):
        q, k, v = qkv(nkv=nkv)
        close(attend(q, k, v), reference(q, k, v), 1e-6)


def test_attend_positions_and_window_mask():
    q, k, v = qkv(T=12)
    pos = torch.arange(12)
    close(attend(q, k, v, q_pos=pos, k_pos=pos, window=5), reference(q, k, v, window=5), 1e-6)
    # the last 3 queries against all 12 keys (decoding against a cache)
    y = attend(q[:, :, -3:], k, v, q_pos=pos[-3:], k_pos=pos, window=5)
    close(y, reference(q, k, v, window=5)[:, :, -3:], 1e-6)
    # (B, T) positions, as routed subsets of tokens use
    bpos = torch.stack([pos, pos])
    close(attend(q, k, v, q_pos=bpos, k_pos=bpos), reference(q, k, v), 1e-6)


def test_window_convention():
    """A query sees itself and the window-1 tokens before it."""
    m = visible(torch.arange(6), torch.arange(6), window=3)
    assert m[4].tolist() == [False, False, True, True, True, False]
    assert m[0].tolist() == [True, False, False, False, False, False]


def test_gqa_head_mapping_catches_tiling_bug():
    """Query head h reads KV head h // (nh / nkv): [0, 0, 1, 1] for 4 query heads over 2 KV heads.
    Tiling with repeat() ([0, 1, 0, 1]) must give a different answer, so the check has teeth."""
    q, k, v = qkv(nh=4, nkv=2)
    want = reference(q, k, v)
    close(attend(q, k, v), want, 1e-6)
    for kernel in ("mask", "chunked", "flash_split"):
        close(local_attend(q, k, v, window=8, kernel=kernel), reference(q, k, v, window=8), 1e-6)
    wrong = F.scaled_dot_product_attention(q, k.repeat(1, 2, 1, 1), v.repeat(1, 2, 1, 1), is_causal=True)
    assert ((wrong.double() - want).norm() / want.norm()) > 0.1


def test_mha_layer_equals_hand_written_multi_head_attention():
    """n_kv_head == n_head: the layer is plain multi-head attention on the same weights."""
    cfg = tiny_config(n_kv_head=4)
    layer = CausalSelfAttention(cfg).eval()
    x = torch.randn(2, 10, cfg.n_embd)
    B, T, C = x.shape
    q, k, v = (x @ layer.c_attn.weight.T).split(C, dim=2)
    heads = lambda t: t.view(B, T, 4, C // 4).transpose(1, 2)  # noqa: E731
    att = heads(q) @ heads(k).transpose(-2, -1) / math.sqrt(C // 4)
    att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
    y = (att @ heads(v)).transpose(1, 2).reshape(B, T, C) @ layer.c_proj.weight.T
    close(layer(x, torch.arange(T)), y, 1e-5)


def test_gqa_layer_reads_kv_head_h_over_group():
    cfg = tiny_config(n_head=4, n_kv_head=2)
    layer = CausalSelfAttention(cfg).eval()
    assert layer.c_attn.weight.shape == (4 * 8 + 2 * 2 * 8, 32)
    x = torch.randn(2, 10, 32)
    q, k, v = (x @ layer.c_attn.weight.T).split([32, 16, 16], dim=2)
    q, k, v = (t.view(2, 10, -1, 8).transpose(1, 2) for t in (q, k, v))
    y = reference(q, k, v).float().transpose(1, 2).reshape(2, 10, 32) @ layer.c_proj.weight.T
    close(layer(x, torch.arange(10)), y, 1e-5)


def test_qk_norm_normalises_each_heads_queries_and_keys():
    layer = CausalSelfAttention(tiny_config(qk_norm=True, n_kv_head=2)).eval()
    x = torch.randn(2, 10, 32)
    q, k, v = (x @ layer.c_attn.weight.T).split([32, 16, 16], dim=2)
    q, k, v = (t.view(2, 10, -1, 8).transpose(1, 2) for t in (q, k, v))
    rms = lambda t: t / (t.pow(2).mean(-1, keepdim=True) + torch.finfo(t.dtype).eps).sqrt()  # noqa: E731
    y = reference(rms(q), rms(k), v).float().transpose(1, 2).reshape(2, 10, 32) @ layer.c_proj.weight.T
    close(layer(x, torch.arange(10)), y, 1e-5)


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_gqa_cache_shrinks(n_kv_head):
    """Allocated cache bytes shrink by n_head / n_kv_head."""
    mha = GPT(tiny_config(n_head=4)).new_cache(2)
    gqa = GPT(tiny_config(n_head=4, n_kv_head=n_kv_head)).new_cache(2)
    assert mha.nbytes() == gqa.nbytes() * (4 // n_kv_head)


def test_gqa_fewer_weights_and_flops():
    base, gqa = GPT(tiny_config()), GPT(tiny_config(n_kv_head=1))
    kv_weights = 2 * 2 * (32 - 8) * 32  # 2 layers, K and V, 3 of 4 heads' rows gone
    assert base.num_params() - gqa.num_params() == kv_weights
    assert base.flops_per_token() - gqa.flops_per_token() == 6 * kv_weights


# ------------------------------------------------------------------------------------------------
# Sliding-window kernels on the CPU: each against the reference, forward and backward

WINDOWS = [(37, 1), (37, 5), (37, 8), (40, 8), (37, 36), (64, 16)]


@pytest.mark.parametrize("T,window", WINDOWS)
@pytest.mark.parametrize("kernel", ["mask", "chunked", "flash_split"])
def test_window_kernels_match_reference(kernel, T, window):
    q, k, v = qkv(T=T, grad=True)
    y = local_attend(q, k, v, window, kernel=kernel)
    close(y, reference(q, k, v, window=window), 1e-6)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (q, k, v), dy)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    pos = torch.arange(T)
    y2 = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=visible(pos, pos, window), enable_gqa=True)
    want = torch.autograd.grad(y2, (q2, k2, v2), dy.double())
    for g, w in zip(grads, want):
        close(g, w, 1e-5)


@pytest.mark.parametrize("T,window,block", [(37, 5, 16), (64, 16, 16), (64, 20, 16), (100, 33, 32)])
def test_flex_block_mask_and_forward(T, window, block):
    """The block mask built from tile indices equals create_block_mask's, and FlexAttention with it
    (eager on the CPU: forward only) equals the reference."""
    from torch.nn.attention.flex_attention import create_block_mask
    ours = window_block_mask(T, window, block, "cpu")
    theirs = create_block_mask(lambda b, h, i, j: (j <= i) & (j > i - window), None, None, T, T,
                               device="cpu", BLOCK_SIZE=block)
    assert torch.equal(ours.to_dense(), theirs.to_dense())
    q, k, v = qkv(T=T)
    old = attention.FLEX_BLOCK_SIZE
    try:
        attention.FLEX_BLOCK_SIZE = block
        close(flex_window(q, k, v, window), reference(q, k, v, window=window), 1e-5)
    finally:
        attention.FLEX_BLOCK_SIZE = old


def test_window_at_least_T_is_global():
    q, k, v = qkv(T=10)
    close(attend(q, k, v, window=10), reference(q, k, v), 1e-6)
    close(attend(q, k, v, window=50), reference(q, k, v), 1e-6)


def test_chunked_and_flash_split_with_dropout_fall_back_and_train():
    q, k, v = qkv(T=20, grad=True)
    y = local_attend(q, k, v, 4, dropout=0.5, kernel="flash_split")  # -> chunked (dropout)
    y.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ------------------------------------------------------------------------------------------------
# Local layers in a model: ring-buffer cache, decoding past the window edge

def all_logits(model, idx):
    """Logits at every position from one full forward (targets given, so the head runs on all)."""
    logits, _ = model(idx, torch.zeros_like(idx))
    return logits


def decode_logits(model, idx, prompt):
    """Prefill `prompt` tokens, then feed the rest one at a time: logits at positions prompt-1 ..."""
    cache = model.new_cache(idx.shape[0])
    out = [model(idx[:, :prompt], cache=cache)[0][:, -1]]
    for t in range(prompt, idx.shape[1]):
        out.append(model(idx[:, t:t + 1], cache=cache)[0][:, -1])
    return torch.stack(out, dim=1), cache


@pytest.mark.parametrize("kw", [
    dict(layers="LG", window=6),
    dict(layers="L", window=1),
    dict(layers="LLG", window=5, pos="rope", n_kv_head=2),
])
@pytest.mark.parametrize("prompt", [3, 12])
def test_decode_past_window_edge_equals_full_forward(kw, prompt):
    model = GPT(tiny_config(n_layer=3, **kw)).eval()
    idx = torch.randint(0, 64, (2, 30))
    with torch.no_grad():
        dec, cache = decode_logits(model, idx, prompt)
        full = all_logits(model, idx)[:, prompt - 1:]
    close(dec, full, 1e-5)
    for c, letter in zip(cache, model.config.layer_kinds()):
        if letter == "L":
            assert isinstance(c, RingKVCache)
            assert c.k.shape[2] == kw["window"] and c.entries() <= kw["window"]


def test_local_layer_windows_by_position_for_routed_tokens():
    """With (B, T) positions (a routed subset of tokens, as Mixture-of-Depths passes), the window
    counts positions, not indices."""
    layer = CausalSelfAttention(tiny_config(pos="rope"), window=4).eval()
    x = torch.randn(2, 6, 32)
    pos = torch.tensor([[0, 2, 3, 7, 8, 9], [1, 2, 3, 4, 5, 6]])
    y = layer(x, pos)
    q, k, v = (x @ layer.c_attn.weight.T).split(32, dim=2)
    q, k, v = (t.view(2, 6, 4, 8).transpose(1, 2) for t in (q, k, v))
    q, k = layer.rotary(q, pos), layer.rotary(k, pos)
    for b in range(2):
        r = reference(q[b:b + 1], k[b:b + 1], v[b:b + 1], window=4, q_pos=pos[b], k_pos=pos[b])
        close(y[b:b + 1], r.float().transpose(1, 2).reshape(1, 6, 32) @ layer.c_proj.weight.T, 1e-5)


def test_ring_cache_never_exceeds_window():
    model = GPT(tiny_config(layers="L", window=4, n_layer=1)).eval()
    cache = model.new_cache(1)
    start = cache.nbytes()
    ids = torch.randint(0, 64, (1, 1))
    with torch.no_grad():
        for t in range(20):
            model(ids, cache=cache)
            ring = cache[0]
            assert ring.entries() == min(t + 1, 4)
            assert sorted(ring.pos.tolist())[-min(t + 1, 4):] == list(range(max(0, t - 3), t + 1))
    assert cache.nbytes() == start
    # a prefill longer than the window keeps only its last `window` tokens
    cache = model.new_cache(1)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 11)), cache=cache)
    assert sorted(cache[0].pos.tolist()) == [7, 8, 9, 10]


def test_local_cache_bytes_formula():
    """5 local : 1 global with window 8 at context 32: (10 * 8 + 2 * 32) / (12 * 32) of all-global,
    plus the rings' position slots."""
    kw = dict(n_layer=12, block_size=32)
    base = GPT(tiny_config(**kw)).new_cache(1).nbytes()
    local = GPT(tiny_config(layers="LLLLLG", window=8, **kw)).new_cache(1)
    kv_bytes = sum(c.k.nbytes + c.v.nbytes for c in local)
    assert kv_bytes / base == (10 * 8 + 2 * 32) / (12 * 32)


def test_local_flops_use_min_window_T():
    g, l = GPT(tiny_config(n_layer=1)), GPT(tiny_config(n_layer=1, layers="L", window=8))
    attn = 12 * 4 * 8  # 12 * n_head * head_dim per key
    assert g.flops_per_token(32) - l.flops_per_token(32) == attn * (32 - 8)
    assert g.flops_per_token(6) == l.flops_per_token(6)


# ------------------------------------------------------------------------------------------------
# Cross-layer KV sharing

def test_kv_share_1_equals_base():
    torch.manual_seed(1)
    a = GPT(tiny_config())
    torch.manual_seed(1)
    b = GPT(tiny_config(kv_share=1))
    idx = torch.randint(0, 64, (2, 16))
    assert torch.equal(all_logits(a, idx), all_logits(b, idx))
    assert kv_owners(b.config) == [0, 1]


@pytest.mark.parametrize("n_layer,share", [(4, 2), (6, 3), (4, 4)])
def test_kv_share_cache_holds_n_layer_over_share(n_layer, share):
    base = GPT(tiny_config(n_layer=n_layer)).new_cache(1)
    model = GPT(tiny_config(n_layer=n_layer, kv_share=share))
    cache = model.new_cache(1)
    assert len({id(c) for c in cache}) == n_layer // share
    assert cache.nbytes() * share == base.nbytes()
    readers = [b.mixer for b in model.blocks if b.mixer.reads_kv]
    assert len(readers) == n_layer - n_layer // share
    assert all(r.c_attn.weight.shape[0] == 32 for r in readers)  # queries only


def test_kv_share_groups_by_kind():
    cfg = tiny_config(n_layer=12, layers="LLLLLG", window=4, kv_share=2)
    assert kv_owners(cfg) == [0, 0, 2, 2, 4, 5, 4, 7, 7, 9, 9, 5]


def test_kv_share_reader_uses_first_layers_keys_and_values():
    """Layer 1 of a kv_share=2 model attends with its own queries to layer 0's keys and values."""
    model = GPT(tiny_config(n_layer=2, kv_share=2, pos="rope")).eval()
    x = torch.randn(2, 9, 32)
    pos = torch.arange(9)
    b0, b1 = model.blocks
    h0 = b0.ln_1(x)
    k0, v0 = (b0.mixer.c_attn(h0)[..., 32:]).split(32, dim=2)
    k0 = b0.mixer.rotary(k0.view(2, 9, 4, 8).transpose(1, 2), pos)
    v0 = v0.view(2, 9, 4, 8).transpose(1, 2)
    x1 = b0(x, pos, slot := attention.SharedKV())
    q1 = b1.mixer.rotary(b1.mixer.c_attn(b1.ln_1(x1)).view(2, 9, 4, 8).transpose(1, 2), pos)
    y1 = reference(q1, k0, v0).float().transpose(1, 2).reshape(2, 9, 32) @ b1.mixer.c_proj.weight.T
    close(b1.mixer(b1.ln_1(x1), pos, slot), y1, 1e-5)


# ------------------------------------------------------------------------------------------------
# Everything at once

COMBINED = dict(n_layer=6, layers="LLG", window=5, pos="rope", rope_fraction=0.5, n_kv_head=2, kv_share=2,
                block_size=32)


def test_all_together_causal_and_cache_decode():
    model = GPT(tiny_config(**COMBINED)).eval()
    idx = torch.randint(0, 64, (2, 32))
    with torch.no_grad():
        full = all_logits(model, idx)
        changed = idx.clone()
        changed[:, 20:] = (changed[:, 20:] + 1) % 64
        assert torch.allclose(all_logits(model, changed)[:, :20], full[:, :20], atol=1e-6)
        assert not torch.allclose(all_logits(model, changed)[:, 20:], full[:, 20:])
        dec, cache = decode_logits(model, idx, 7)
    close(dec, full[:, 6:], 1e-5)
    assert len({id(c) for c in cache}) == 3  # L pairs (0,1), (3,4); G pair (2,5)


def test_all_together_bytes_ratio():
    """The issue's configuration at a small scale: 5 local : 1 global, GQA 4 -> 1 KV heads (4x), and
    kv_share=2, against all-global MHA: (5 * w + 1 * T) / (12 * T) / 4 of the bytes, plus ring
    position slots."""
    kw = dict(n_layer=12, block_size=64, n_head=4)
    base = GPT(tiny_config(**kw)).new_cache(1).nbytes()
    small = GPT(tiny_config(layers="LLLLLG", window=16, n_kv_head=1, kv_share=2, **kw)).new_cache(1)
    kv_bytes = sum(c.k.nbytes + c.v.nbytes for c in {id(c): c for c in small}.values())
    assert kv_bytes / base == (5 * 16 + 64) / (12 * 64) / 4


def test_generate_with_everything():
    from gpt.generate import generate
    model = GPT(tiny_config(**COMBINED)).eval()
    idx = torch.randint(0, 64, (1, 4))
    a = generate(model, idx, 40, temperature=0, use_cache=True)
    b = generate(model, idx, 40, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_train_and_sample_scripts_with_everything(data_root, tmp_path, capsys):
    sys.path.insert(0, ROOT)
    import sampling
    import train
    out = str(tmp_path / "run")
    args = ["--preset", "cpu-tiny", "--data_dir", data_root, "--dataset", "tiny_char", "--out_dir", out,
            "--max_iters", "4", "--eval_interval", "2", "--eval_iters", "1", "--batch_size", "4",
            "--block_size", "32", "--n_layer", "3", "--layers", "LLG", "--window", "8", "--pos", "rope",
            "--n_kv_head", "2", "--kv_share", "2", "--dropout", "0.1"]
    train.main(args)
    assert os.path.exists(os.path.join(out, "ckpt.pt"))
    sampling.main(["--out_dir", out, "--max-new-tokens", "40", "--num-samples", "1", "--device", "cpu"])
    assert "sample 1" in capsys.readouterr().out


@pytest.mark.parametrize("bad,msg", [
    (dict(n_kv_head=3), "must divide n_head"),
    (dict(window=0), "window"),
    (dict(kv_share=0), "kv_share"),
    (dict(layers="LG", attn_experts=4, attn_experts_active=2), "local layers"),
])
def test_config_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        tiny_config(**bad)


# ------------------------------------------------------------------------------------------------
# GPU: the fast window paths against the reference, fp32 (1e-4 relative) and bf16 (1e-2)

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("kernel,T,window,nkv", [
    ("flash_split", 1000, 256, 2), ("flash_split", 2048, 1024, 1), ("flex", 1000, 256, 2),
    ("chunked", 1000, 256, 2), ("mask", 1000, 256, 2)])
def test_gpu_window_kernels(kernel, T, window, nkv, dtype, tol):
    """Each sliding-window kernel against the fp64 reference, forward and backward (in fp32 the
    flash_split kernel falls back to chunked: flash kernels are fp16/bf16 only)."""
    q, k, v = qkv(B=2, nh=4, nkv=nkv, T=T, hs=64, dtype=dtype, device="cuda", grad=True)
    y = local_attend(q, k, v, window, kernel=kernel)
    pos = torch.arange(T, device="cuda")
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=visible(pos, pos, window), enable_gqa=True)
    close(y, want, tol)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (q, k, v), dy)
    ref = torch.autograd.grad(want, (q2, k2, v2), dy.double())
    for g, w in zip(got, ref):
        close(g, w, tol)


@gpu
@pytest.mark.gpu
def test_gpu_traced_model_with_local_layers():
    """The model with local layers, GQA, RoPE and KV sharing traced by torch.compile (aot_eager: the
    graph capture train.py relies on, without inductor's compile time) matches eager mode in bf16
    autocast, loss and gradients, with WINDOW_KERNEL's path inside."""
    cfg = GPTConfig(vocab_size=256, block_size=1024, n_layer=3, n_head=4, n_embd=256, layers="LLG",
                    window=256, pos="rope", n_kv_head=2, kv_share=2)
    model = GPT(cfg).cuda()
    idx = torch.randint(0, 256, (2, 1024), device="cuda")
    grads = []
    for run in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = run(idx, idx)
        loss.backward()
        grads.append((loss.item(), model.blocks[0].mixer.c_attn.weight.grad.clone()))
    (a, ga), (b, gb) = grads
    assert abs(a - b) < 1e-3
    close(gb, ga, 1e-2)


@gpu
@pytest.mark.gpu
def test_gpu_bf16_cached_decode_matches_full_forward():
    """generate()'s path on a GPU in bf16 (under decoding_kernels, as generate() runs): prefill, then
    one token at a time: against a global layer's cache without a mask (flash's split-KV kernel may
    take it), against a local layer's ring buffer with one; GQA, RoPE and KV sharing on. Logits
    equal the uncached full forward's."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=256, n_layer=4, n_head=4, n_embd=256, layers="LG",
                    window=64, pos="rope", n_kv_head=2, kv_share=2)
    model = GPT(cfg).cuda().bfloat16().eval()
    idx = torch.randint(0, 256, (4, 200), device="cuda")
    with torch.no_grad(), attention.decoding_kernels():
        full, _ = model(idx, idx)
        cache = model.new_cache(4, 200)
        prefill = idx[:, :150].contiguous()
        got = [model(prefill, prefill, cache=cache)[0]]
        got += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(150, 200)]
    got = torch.cat(got, dim=1).float()
    assert (got - full.float()).norm() / full.float().norm() < 1e-2
