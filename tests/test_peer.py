"""PEER (gpt/peer.py): product-key retrieval against brute force, the layer against its spelled-out
reference, a million-expert layer, and models using it (causality, KV-cache decoding, counting)."""

import pytest
import torch

from conftest import assert_causal, tiny_config
from gpt.model import GPT
from gpt.peer import PEER, all_key_scores, product_key_topk

PEER_CFG = dict(ffn="peer", peer_keys=8, peer_key_sets=2, peer_key_dim=8, peer_heads=2, peer_topk=4)


@pytest.mark.parametrize("n, d, k", [(8, 2, 4), (16, 2, 16), (5, 3, 4), (4, 4, 3), (12, 1, 5)])
def test_product_key_retrieval_equals_brute_force(n, d, k):
    """Top-k by product keys (top-k per set, then top-k of k·k, set by set) returns exactly the
    top-k over all n^d keys: the same ids in the same order and the same scores."""
    q = torch.randn(50, 3, d, 6, dtype=torch.float64)  # (tokens, heads, d, dk)
    keys = torch.randn(d, n, 6, dtype=torch.float64)
    scores, ids = product_key_topk(q, keys, k)  # (50, 3, k)
    all_scores = all_key_scores(q, keys)  # (50, 3, n^d)
    assert all_scores.shape[-1] == n ** d
    ref_scores, ref_ids = all_scores.topk(k, dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores)
    # and an expert's id decodes to the sub-keys whose scores add up to its score
    digits = [(ids // n ** (d - 1 - j)) % n for j in range(d)]
    total = sum(torch.einsum("thc,thkc->thk", q[:, :, j], keys[j][digits[j]]) for j in range(d))
    torch.testing.assert_close(total, scores)


def test_forward_equals_reference():
    cfg = tiny_config(**PEER_CFG, activation="relu2")
    layer = PEER(cfg)
    x = torch.randn(3, 9, 32)
    torch.testing.assert_close(layer(x), layer.forward_reference(x), rtol=1e-5, atol=1e-6)
    # gradients reach the query network, the sub-keys and the chosen experts only
    layer(x).square().sum().backward()
    assert layer.query.weight.grad.abs().sum() > 0 and layer.keys.grad.abs().sum() > 0
    used = layer.w_out.grad.abs().sum(1) > 0
    assert 0 < used.sum() <= 3 * 9 * 2 * 4


def test_million_expert_layer_forward_backward():
    """1024 x 1024 product keys: 1,048,576 experts, forward and backward on a CPU."""
    cfg = tiny_config(n_embd=16, n_head=2, ffn="peer", peer_keys=1024, peer_key_sets=2,
                      peer_key_dim=16, peer_heads=2, peer_topk=8)
    layer = PEER(cfg)
    assert layer.n_expert == 1024 ** 2 and layer.w_in.shape == (1024 ** 2, 16)
    x = torch.randn(2, 8, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    touched = (layer.w_in.grad.abs().sum(1) > 0).sum().item()
    assert 0 < touched <= 2 * 8 * 2 * 8  # at most tokens x heads x k experts got a gradient


def test_query_norm_is_per_token():
    """The query normalisation uses one token only: a token's retrieval is the same alone or in a
    batch (BatchNorm would fail this)."""
    layer = PEER(tiny_config(**PEER_CFG)).train()
    x = torch.randn(4, 10, 32)
    g_all, ids_all = layer.retrieve(x.view(-1, 32))
    g_one, ids_one = layer.retrieve(x[2, 3:4])
    assert torch.equal(ids_all[2 * 10 + 3], ids_one[0])
    torch.testing.assert_close(g_all[2 * 10 + 3], g_one[0])


MODELS = {"peer": PEER_CFG, "peer-3-sets-every-2": dict(PEER_CFG, peer_key_sets=3, moe_every=2, pos="rope")}


@pytest.mark.parametrize("name", MODELS)
def test_causal(name):
    assert_causal(GPT(tiny_config(**MODELS[name])).train())  # training mode: the query norm must be causal


@pytest.mark.parametrize("name", MODELS)
def test_kv_cache_decode_matches_full_forward(name):
    model = GPT(tiny_config(**MODELS[name])).eval()
    idx = torch.randint(0, 64, (2, 20))
    full, _ = model(idx, idx)
    cache = model.new_cache(2)
    logits, _ = model(idx[:, :8], cache=cache)
    torch.testing.assert_close(logits[:, -1], full[:, 7], rtol=1e-4, atol=1e-5)
    for t in range(8, 20):
        logits, _ = model(idx[:, t:t + 1], cache=cache)
        torch.testing.assert_close(logits[:, -1], full[:, t], rtol=1e-4, atol=1e-5)


def test_active_params_closed_form():
    C, L, V, T, n, d, dk, h, k = 32, 2, 64, 32, 8, 2, 8, 2, 4
    model = GPT(tiny_config(**PEER_CFG))
    N = n ** d
    attn = 4 * C * C
    emb, norms = V * C + T * C, (2 * L + 1) * C
    peer_total = C * h * d * dk + d * n * dk + 2 * N * C
    peer_active = C * h * d * dk + d * n * dk + h * k * 2 * C
    assert model.num_params() == emb + norms + L * (attn + peer_total)
    assert model.active_params() == emb + norms + L * (attn + peer_active)
    peer_flops = 6 * (C * h * d * dk + h * d * n * dk + h * k * 2 * C)
    assert model.flops_per_token(T) == 6 * V * C + L * (6 * attn + 12 * C * T + peer_flops)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_million_experts_bf16_on_gpu_match_reference(fresh_compile):
    """On the GPU under bf16 autocast: forward (embedding_bag) equals the spelled-out reference, and
    a compiled training step of a model with a 1M-expert layer runs."""
    torch.manual_seed(0)
    cfg = tiny_config(n_embd=64, ffn="peer", peer_keys=1024, peer_key_dim=32, peer_heads=4, peer_topk=8)
    layer = PEER(cfg).cuda()
    x = torch.randn(4, 64, 64, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y, ref = layer(x), layer.forward_reference(x)
    assert ((y.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    model = GPT(tiny_config(n_embd=64, **{k: v for k, v in cfg.__dict__.items() if k.startswith("peer")},
                            ffn="peer", moe_every=2)).cuda()
    idx = torch.randint(0, 64, (4, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = torch.compile(model)(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[1].ffn.w_out.grad.abs().sum() > 0
