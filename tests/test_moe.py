"""Mixture of experts (gpt/moe.py): routing, balancing, dispatch paths, the mixture of attention
heads, and models built with them (causality, KV-cache decoding, parameter counts)."""

import json
import os

import pytest
import torch

from conftest import assert_causal, tiny_config
from gpt import moe
from gpt.config import GPTConfig
from gpt.model import GPT, MLP
from gpt.moe import MoA, MoE, Router, count_experts, counting_sort, expert_matmul


def gpu(test):
    """A GPU test: marked `gpu` (bench/gpu_check.sh runs `pytest -m gpu`), skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


MOE = dict(ffn="moe", n_expert=8, n_expert_active=2, n_shared_expert=1)
MOA = dict(attn_experts=4, attn_experts_active=2)


# ------------------------------------------------------------------------------------------------
# MoE layer

def test_identical_experts_equal_the_dense_mlp():
    """Gates sum to 1, so E copies of one MLP routed top-k give exactly that MLP."""
    cfg = tiny_config(ffn="moe", n_expert=6, n_expert_active=2, n_shared_expert=0, moe_hidden=128)
    mlp, layer = MLP(cfg), MoE(cfg)  # mlp_ratio 4 * 32 = 128 hidden, as the experts
    with torch.no_grad():
        layer.w1.copy_(mlp.c_fc.weight.T.expand(6, -1, -1))  # (E, C, H)
        layer.w2.copy_(mlp.c_proj.weight.T.expand(6, -1, -1))  # (E, H, C)
    x = torch.randn(3, 10, 32)
    torch.testing.assert_close(layer(x), mlp(x), rtol=1e-5, atol=1e-6)


def test_dropless_every_token_gets_k_experts():
    cfg = tiny_config(**MOE)
    layer = MoE(cfg)
    with torch.no_grad():  # route nearly everything to expert 0: still no token is dropped
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0] = 5.0
    x = torch.randn(4, 16, 32).abs()
    layer(x)
    counts = layer.router.stats["expert_counts"]
    assert counts.sum().item() == 4 * 16 * 2
    assert counts[0].item() == 4 * 16  # every token chose expert 0, and got a second one too


@pytest.mark.parametrize("E, M", [(1, 5), (8, 24), (64, 3000)])
def test_counting_sort_is_the_stable_argsort(E, M):
    keys = torch.randint(0, E, (M,))
    keys[: M // 3] = E - 1  # a crowded expert, and (for E = 64) experts nobody chose
    order = counting_sort(keys, count_experts(keys, E))
    assert torch.equal(order, keys.argsort(stable=True))


def test_loop_path_equals_dense_per_token_computation():
    """The dispatch (sort by expert, matmul per block, unsort, gate) equals computing every token's
    chosen experts one by one."""
    cfg = tiny_config(**MOE)
    layer = MoE(cfg)
    x = torch.randn(2, 7, 32)
    y = layer(x)
    x2 = x.view(-1, 32)
    idx, gates, _ = layer.router(x2)
    ref = layer.shared[1](torch.nn.functional.gelu(layer.shared[0](x2)))
    for t in range(x2.shape[0]):
        for j in range(2):
            e = idx[t, j]
            ref[t] += gates[t, j] * (torch.nn.functional.gelu(x2[t] @ layer.w1[e]) @ layer.w2[e])
    torch.testing.assert_close(y.view(-1, 32), ref, rtol=1e-5, atol=1e-6)


def _grouped_vs_loop(device, monkeypatch):
    for layout in ("kn", "nk"):  # the weights handed to the grouped GEMM as stored, and d_in-contiguous
        monkeypatch.setattr(moe, "GROUPED_LAYOUT", layout)
        _grouped_vs_loop_once(device)


def _grouped_vs_loop_once(device):
    torch.manual_seed(0)
    E, M, d_in, d_out = 8, 300, 64, 96
    counts = torch.bincount(torch.randint(0, E - 2, (M,)), minlength=E).to(device)  # 2 experts empty
    xs = torch.randn(M, d_in, device=device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(E, d_in, d_out, device=device, requires_grad=True)
    g = torch.randn(M, d_out, device=device, dtype=torch.bfloat16)
    out = {}
    for grouped in (True, False):
        y = expert_matmul(xs, w, counts, grouped=grouped)
        xs.grad = w.grad = None
        (y.float() * g.float()).sum().backward()
        out[grouped] = (y.float(), xs.grad.float(), w.grad.float())
    for a, b in zip(out[True], out[False]):
        assert ((a - b).norm() / b.norm()).item() < 1e-2  # bf16: relative to the whole tensor


@gpu
def test_grouped_gemm_equals_loop_gpu(monkeypatch):
    _grouped_vs_loop("cuda", monkeypatch)


def test_grouped_gemm_equals_loop_cpu_when_available(monkeypatch):
    """torch._grouped_mm also has a CPU kernel in recent PyTorch: check the same path there."""
    try:
        torch._grouped_mm(torch.zeros(8, 8, dtype=torch.bfloat16), torch.zeros(1, 8, 8, dtype=torch.bfloat16),
                          offs=torch.tensor([8], dtype=torch.int32))
    except (AttributeError, RuntimeError, NotImplementedError):
        pytest.skip("torch._grouped_mm has no CPU kernel in this PyTorch")
    _grouped_vs_loop("cpu", monkeypatch)


@gpu
def test_moe_model_grouped_equals_loop_gpu():
    """A whole MoE + MoA model in bf16 autocast: the grouped path (auto on GPU) and the loop agree."""
    torch.manual_seed(0)
    cfg = tiny_config(**MOE, **MOA, n_embd=64)
    model = GPT(cfg).cuda()
    idx = torch.randint(0, 64, (4, 32), device="cuda")
    losses = {}
    for grouped in (None, False):
        for m in model.modules():
            if isinstance(m, (MoE, MoA)):
                m.grouped = grouped
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
        losses[grouped] = loss.item()
    assert abs(losses[None] - losses[False]) < 1e-2 * losses[False]


@gpu
def test_compiled_routed_model_matches_eager_gpu(fresh_compile):
    """torch.compile with fullgraph=True: routing, grouped GEMMs, the aux loss and the expert
    counts (set as attributes during forward) and the load buffer all live in one graph."""
    torch.manual_seed(0)
    model = GPT(tiny_config(**MOE, **MOA, n_embd=64, pos="rope", moe_aux_coef=0.01)).cuda()
    idx = torch.randint(0, 64, (4, 32), device="cuda")
    out = {}
    for name, run in (("eager", model), ("compiled", torch.compile(model, fullgraph=True))):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = run(idx, idx)
            aux = model.aux_loss()
        (loss + aux).backward()
        counts = model.stats()["blocks.0.ffn.router.expert_counts"]
        out[name] = (loss.item(), aux.item(), counts.sum().item())
    assert abs(out["eager"][0] - out["compiled"][0]) < 1e-2 * out["eager"][0]
    assert abs(out["eager"][1] - out["compiled"][1]) < 1e-2 * out["eager"][1]
    assert out["eager"][2] == out["compiled"][2] == 4 * 32 * 2
    before = model.blocks[0].ffn.router.expert_bias.clone()
    model.after_step()
    assert not torch.equal(before, model.blocks[0].ffn.router.expert_bias)


def test_routed_model_compiles_as_one_graph():
    """The same capture on a CPU (graph only, no code generation): no graph break anywhere, so the
    grouped path adds no host sync. The grouped path is forced (the CPU default is the loop)."""
    torch.set_num_threads(1)
    model = GPT(tiny_config(**MOE, **MOA, n_layer=1, moe_aux_coef=0.01))
    for m in model.modules():
        if isinstance(m, (MoE, MoA)):
            m.grouped = True
    idx = torch.randint(0, 64, (2, 16))
    _, eager = model(idx, idx)
    try:
        _, compiled = torch.compile(model, fullgraph=True, backend="eager")(idx, idx)
    except RuntimeError as e:
        if "grouped_mm" in str(e):
            pytest.skip(f"torch._grouped_mm has no CPU kernel here: {e}")
        raise
    torch.testing.assert_close(compiled, eager)
    assert model.aux_loss() is not None and model.blocks[0].ffn.router.load.sum() == 2 * 2 * 16 * 2


# ------------------------------------------------------------------------------------------------
# Router: balancing

def test_switch_loss_equals_its_floor_under_uniform_routing():
    """L = α E sum_i f_i P_i with P_i = 1/E for all i is α exactly, whatever the choices f."""
    for score in ("softmax", "sigmoid"):
        r = Router(16, 8, 2, score=score, aux_coef=0.01)
        with torch.no_grad():
            r.gate.weight.zero_()  # every score equal: uniform routing probabilities
        r.train()
        r(torch.randn(64, 16))
        assert abs(r.aux_loss.item() - 0.01) < 1e-9


def test_switch_loss_above_floor_when_skewed_and_has_gradient():
    r = Router(16, 8, 2, score="softmax", aux_coef=1.0)
    with torch.no_grad():
        r.gate.weight[0] += 2.0
    x = torch.randn(256, 16).abs()
    r(x)
    assert r.aux_loss.item() > 1.1
    r.aux_loss.backward()
    assert r.gate.weight.grad.abs().sum() > 0
    r.eval()
    r(x)
    assert r.aux_loss is None  # training only


@pytest.mark.parametrize("score, rate, bound", [("sigmoid", 0.003, 100), ("softmax", 0.001, 350)])
def test_bias_update_balances_a_skewed_router(score, rate, bound):
    """Experts 0 and 1 start with every token (max/mean load = E/k = 4); the sign updates of the
    bias bring max/mean below 1.2 within `bound` steps, and it stays there on average. (Softmax
    scores are ~1/E, and their spread to undo here is larger: a smaller rate and more steps.)"""
    torch.manual_seed(0)
    E, k, N = 8, 2, 4096
    r = Router(16, E, k, score=score, bias_update_rate=rate)
    with torch.no_grad():
        r.gate.weight.normal_(0, 0.3)
        r.gate.weight[:, 0] = 0.0
        r.gate.weight[0, 0], r.gate.weight[1, 0] = 1.0, 0.8
    r.train()
    history = []
    for step in range(bound + 50):
        x = torch.randn(N, 16)
        x[:, 0] = 3.0  # a constant feature that experts 0 and 1 love
        r(x)
        c = r.stats["expert_counts"].float()
        history.append((c.max() / c.mean()).item())
        r.after_step()
    assert history[0] > 3.0
    first = next(i for i, h in enumerate(history) if h < 1.2)
    assert first <= bound, f"balanced only at step {first}"
    assert sum(history[-50:]) / 50 < 1.2, "balance was not kept"


def test_gate_weights_do_not_depend_on_the_bias():
    r = Router(16, 8, 3, score="sigmoid")
    x = torch.randn(200, 16)
    idx0, g0, _ = r(x)
    s = r.scores(x)
    with torch.no_grad():
        r.expert_bias.copy_(torch.randn(8) * 0.3)
    idx1, g1, _ = r(x)
    assert not torch.equal(idx0, idx1)  # the bias changed some choices ...
    for idx, g in ((idx0, g0), (idx1, g1)):  # ... and the gates are the unbiased scores, normalised
        chosen = s.gather(1, idx)
        torch.testing.assert_close(g, chosen / chosen.sum(1, keepdim=True))
    same = (idx0.sort(1).values == idx1.sort(1).values).all(1)  # tokens whose choice did not change
    assert same.any()
    torch.testing.assert_close(g0.gather(1, idx0.argsort(1))[same], g1.gather(1, idx1.argsort(1))[same])
    assert not r.expert_bias.requires_grad


def test_bias_is_saved_and_load_only_counts_training():
    r = Router(16, 8, 2)
    r.eval()
    r(torch.randn(10, 16))
    assert r.load.sum() == 0
    r.train()
    r(torch.randn(10, 16))
    assert r.load.sum() == 20
    r.after_step()
    assert r.load.sum() == 0 and r.expert_bias.abs().sum() > 0
    assert "expert_bias" in r.state_dict() and "load" not in r.state_dict()


# ------------------------------------------------------------------------------------------------
# Models using MoE / MoA: causality, KV-cache decoding, counting

MODELS = {
    "moe": dict(**MOE),
    "moe-every-2": dict(**MOE, moe_every=2, moe_score="softmax"),
    "moa": dict(**MOA),
    "moa-rope-moe": dict(**MOA, **MOE, pos="rope", moe_aux_coef=0.01),
}


@pytest.mark.parametrize("name", MODELS)
def test_causal(name):
    la, lb = assert_causal(GPT(tiny_config(**MODELS[name])).eval())
    assert not torch.allclose(la[:, 12:], lb[:, 12:])


@pytest.mark.parametrize("name", MODELS)
def test_kv_cache_decode_matches_full_forward(name):
    model = GPT(tiny_config(**MODELS[name])).eval()
    idx = torch.randint(0, 64, (2, 20))
    full, _ = model(idx, idx)  # (B, T, V)
    cache = model.new_cache(2)
    logits, _ = model(idx[:, :8], cache=cache)  # prefill
    torch.testing.assert_close(logits[:, -1], full[:, 7], rtol=1e-4, atol=1e-5)
    for t in range(8, 20):
        logits, _ = model(idx[:, t:t + 1], cache=cache)
        torch.testing.assert_close(logits[:, -1], full[:, t], rtol=1e-4, atol=1e-5)


def test_moe_every_picks_layers():
    model = GPT(tiny_config(**MOE, n_layer=4, moe_every=2))
    kinds = [type(b.ffn).__name__ for b in model.blocks]
    assert kinds == ["MLP", "MoE", "MLP", "MoE"]


def test_active_params_closed_form():
    C, L, V, T, E, k, s, H = 32, 2, 64, 32, 8, 2, 1, 24
    cfg = tiny_config(**MOE, **MOA, moe_hidden=H)
    model = GPT(cfg)
    hs, hpe = C // 4, 4 // 2
    emb = V * C + T * C  # tied token table, learned positions
    norms = (2 * L + 1) * C  # LayerNorm weights (no biases: config.bias is False)
    moa_total = C * 4 + C * 2 * hpe * hs + 4 * 2 * C * hpe * hs  # router, shared kv, E (q, o) experts
    moa_active = C * 4 + C * 2 * hpe * hs + 2 * 2 * C * hpe * hs
    moe_total = C * E + E * 2 * C * H + 2 * C * s * H
    moe_active = C * E + k * 2 * C * H + 2 * C * s * H
    assert model.num_params() == emb + norms + L * (moa_total + moe_total)
    assert model.active_params() == emb + norms + L * (moa_active + moe_active)
    flops = 6 * V * C + L * (6 * moa_active + 12 * 2 * hpe * hs * T + 6 * moe_active)
    assert model.flops_per_token(T) == flops


def test_default_expert_width_matches_dense_mlp():
    cfg = GPTConfig(ffn="moe")  # GPT-2 small: 768 wide, MLP 3072; 6 routed + 2 shared experts
    assert cfg.expert_hidden == 3072 // 8


def test_training_step_moves_bias_through_gpt():
    model = GPT(tiny_config(**MOE, **MOA, moe_aux_coef=0.01))
    idx = torch.randint(0, 64, (2, 16))
    _, loss = model(idx, idx)
    aux = model.aux_loss()
    assert aux is not None and aux.item() > 0
    (loss + aux).backward()
    model.after_step()
    biases = [m.expert_bias for m in model.modules() if isinstance(m, Router)]
    assert len(biases) == 4 and all(b.abs().sum() > 0 for b in biases)
    stats = model.stats()
    assert stats["blocks.1.ffn.router.expert_counts"].sum() == 32 * 2


@pytest.mark.parametrize("kw, match", [
    (dict(ffn="moe", n_expert=4, n_expert_active=5), "n_expert_active"),
    (dict(ffn="mlp", moe_every=0), "moe_every"),
    (dict(attn_experts=4, attn_experts_active=3, n_head=4), "divisible"),
    (dict(ffn="moe", bias_update_rate=-1.0), "bias_update_rate"),
    (dict(ffn="peer", peer_keys=4, peer_topk=8), "peer_topk"),
    (dict(ffn="sparse"), "ffn"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kw)


def test_usage_heatmaps_from_log_records(tmp_path):
    records = [{"kind": "eval", "step": 0}]
    for step in (10, 20):
        records.append({"kind": "train", "step": step, "blocks.0.ffn.router.expert_counts": [5, 1, 0, 2],
                        "blocks.1.ffn.router.expert_counts": [2, 2, 2, 2],
                        "blocks.1.mixer.router.expert_counts": [4, 4]})
    records.append({"kind": "eval", "step": 20})
    paths = moe.save_usage_heatmaps(records, str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == ["experts_ffn.png", "experts_mixer.png"]
    assert all(os.path.getsize(p) > 0 for p in paths)
    assert moe.save_usage_heatmaps([{"kind": "eval", "step": 0}], str(tmp_path)) == []
    json.dumps(records)  # what train.py logs is plain JSON
