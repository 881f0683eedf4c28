"""Mixture-of-Depths (gpt/mod.py): routing by top-k in training and by the causal predictor at
inference, original positions, the residual added once, causality, KV-cache decoding, the
predictor learning the top-k choice, FLOPs, config checks and the mixture-of-mixtures preset."""

import pytest
import torch

import sampling
import train
from conftest import TEXT, tiny_config
from gpt.config import PRESETS, GPTConfig
from gpt.generate import generate
from gpt.mod import MoD, RoutedCache, capacity_tokens
from gpt.model import GPT, Block
from gpt.moe import MoA

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MOD = dict(n_layer=4, mod_every=2, mod_capacity=0.25)


def routed_block(**kw):
    cfg = tiny_config(**{**MOD, **kw})
    return MoD(Block(cfg, 1), cfg), cfg


def route_some(model):
    """Give each predictor a random last layer: it routes about half of the tokens at inference."""
    for m in model.modules():
        if isinstance(m, MoD):
            with torch.no_grad():
                m.predictor[-1].weight.normal_(0.0, 1.0)
                m.predictor[-1].bias.zero_()
    return model


def positions_seen(mod):
    """Record the positions each call of the wrapped mixer receives."""
    seen = []
    mod.block.mixer.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    return seen


# ------------------------------------------------------------------------------------------------
# The routed block

def test_capacity_one_with_router_weight_one_is_the_dense_block():
    mod, _ = routed_block(mod_capacity=1.0, pos="rope")
    with torch.no_grad():
        mod.router_w.zero_()
        mod.router_b.fill_(1.0)  # r = 1 for every token
    x = torch.randn(3, 12, 32)
    pos = torch.arange(12)
    torch.testing.assert_close(mod(x, pos), mod.block(x, pos), rtol=1e-5, atol=1e-6)


def test_top_k_tokens_keep_their_original_positions():
    mod, _ = routed_block(pos="rope")
    seen = positions_seen(mod)
    x = torch.randn(2, 16, 32)
    mod(x, torch.arange(16))
    r, _ = mod.scores(x)
    k = capacity_tokens(0.25, 16)
    expected = r.topk(k, dim=1).indices.sort(dim=1).values  # (B, k): in order
    assert seen[0].shape == (2, k) and torch.equal(seen[0], expected)
    # and RoPE sees them: the block's output equals the block run on the gathered tokens at those positions
    xs = x.gather(1, expected[..., None].expand(-1, -1, 32))
    ys = mod.block(xs, expected)
    w = r.gather(1, expected)[..., None]
    out = mod(x, torch.arange(16)).gather(1, expected[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(out, xs + w * (ys - xs))
    assert not torch.allclose(ys, mod.block(xs, torch.arange(k)))  # positions 0..k-1 would differ


def test_router_gradient_equals_the_paper_formulation():
    """forward recomputes r on the routed tokens only; the gradients it gives the router, the block
    and the input must equal those of x_i + r_i f(x_i) with r taken over the whole sequence."""
    mod, _ = routed_block()
    x = torch.randn(2, 16, 32, requires_grad=True)
    g = torch.randn(2, 16, 32)
    params = [mod.router_w, mod.router_b, *mod.block.parameters()]

    def grads(out):
        return torch.autograd.grad((out * g).sum(), [x, *params])

    got = grads(mod(x, torch.arange(16)))
    r = x @ mod.router_w + mod.router_b  # (B, T), with gradient
    idx = r.topk(capacity_tokens(0.25, 16), dim=1).indices.sort(dim=1).values  # (B, k)
    gather = idx[..., None].expand(-1, -1, 32)
    xs = x.gather(1, gather)  # (B, k, C)
    ys = mod.block(xs, idx)
    want = grads(x.scatter(1, gather, xs + r.gather(1, idx)[..., None] * (ys - xs)))
    assert got[1].abs().sum() > 0  # the router learns
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_inference_routes_by_the_predictor_at_original_positions():
    mod, _ = routed_block()
    route_some(mod).eval()
    seen = positions_seen(mod)
    x = torch.randn(2, 16, 32)
    mod(x, torch.arange(16))
    _, p = mod.scores(x)
    routed = p > 0
    assert 0 < routed.sum() < routed.numel()
    for b in range(2):
        n = int(routed[b].sum())
        assert torch.equal(seen[0][b, :n], routed[b].nonzero().squeeze(-1))
    assert mod.stats["routed"].item() == pytest.approx(routed.float().mean().item())


def test_residual_is_added_exactly_once():
    mod, _ = routed_block()
    x = torch.randn(2, 16, 32)
    with torch.no_grad():  # a block whose mixer and MLP output zero: f(x) = 0, so x' = x exactly
        mod.block.mixer.c_proj.weight.zero_()
        mod.block.ffn.c_proj.weight.zero_()
    assert torch.equal(mod(x, torch.arange(16)), x)
    mod, _ = routed_block()
    out = mod(x, torch.arange(16))
    r, _ = mod.scores(x)
    top = r.topk(4, dim=1).indices
    skipped = torch.ones(2, 16, dtype=torch.bool).scatter(1, top, False)
    assert torch.equal(out[skipped], x[skipped])  # unrouted tokens pass untouched
    assert not torch.equal(out[~skipped], x[~skipped])


def test_predictor_loss_trains_only_the_predictor():
    """The stop-gradient: the BCE loss reaches the predictor's weights and nothing else."""
    model = GPT(tiny_config(**MOD))
    idx = torch.randint(0, 64, (2, 32))
    model(idx, idx)
    model.aux_loss().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (".predictor." in name), name
    stats = model.stats()
    assert set(stats) == {f"blocks.{i}.{k}" for i in (1, 3) for k in ("routed", "predictor_acc")}
    assert stats["blocks.1.routed"].item() == pytest.approx(8 / 32)


# ------------------------------------------------------------------------------------------------
# Causality and decoding

def changed_prefix(model, idx, t):
    """Max change of the logits before position t when the tokens from t on are changed."""
    other = idx.clone()
    other[:, t:] = (other[:, t:] + 1) % 64
    with torch.no_grad():
        a, _ = model(idx, idx)
        b, _ = model(other, other)
    return (a[:, :t] - b[:, :t]).abs().max().item()


MIXERS = {  # the attention kinds a routed block can hold, beside the default multi-head one
    "rope": dict(pos="rope"),
    "moa": dict(pos="rope", attn_experts=4, attn_experts_active=2),
    "mla": dict(pos="rope", attn="mla"),
}


@pytest.mark.parametrize("case", MIXERS)
def test_top_k_routing_sees_the_future_and_the_predictor_does_not(case):
    torch.manual_seed(1)
    model = route_some(GPT(tiny_config(**MOD, **MIXERS[case])))
    idx = torch.randint(0, 64, (4, 32))
    assert changed_prefix(model.train(), idx, 20) > 1e-3  # training-time top-k: not causal
    model.eval()  # the predictor: the past is untouched (up to rounding: the packed batch changes shape)
    for t in (1, 10, 20, 31):
        assert changed_prefix(model, idx, t) < 1e-6


CACHE_CASES = {
    **MIXERS,
    "learned-gqa": dict(n_kv_head=2),
    "local": dict(pos="rope", layers="L", window=6),
    "mla-local": dict(pos="rope", attn="mla", layers="L", window=6),
    "moe": dict(pos="rope", ffn="moe", n_expert=4, n_expert_active=2, n_shared_expert=1),
}


@pytest.mark.parametrize("case", CACHE_CASES)
def test_kv_cache_decode_equals_full_forward_in_inference(case):
    model = route_some(GPT(tiny_config(**MOD, **CACHE_CASES[case]))).eval()
    idx = torch.randint(0, 64, (3, 32))
    inputs = {}
    hooks = [model.blocks[i].register_forward_pre_hook(lambda m, args, i=i: inputs.update({i: args[0]}))
             for i in (1, 3)]
    with torch.no_grad():
        full, _ = model(idx, idx)  # (B, T, V)
        for h in hooks:
            h.remove()
        cache = model.new_cache(3, 32)
        logits = [model(idx[:, :12], cache=cache)[0]]  # prefill
        logits += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(12, 32)]
    torch.testing.assert_close(torch.cat(logits, 1), full[:, 11:], rtol=1e-4, atol=1e-5)
    # each routed layer cached exactly the tokens its predictor routed in the full forward, at their positions
    for i in (1, 3):
        c = cache[i]
        assert isinstance(c, RoutedCache)
        routed = model.blocks[i].scores(inputs[i])[1] > 0  # (B, T)
        assert 0 < int(c.length.min()) and int(c.length.max()) < 32
        for b in range(3):
            n = int(c.length[b])
            assert torch.equal(c.pos[b, :n], routed[b].nonzero().squeeze(-1))
            assert torch.all(c.pos[b, n:] > 32)  # empty slots: never visible


def test_generate_with_cache_equals_without():
    model = route_some(GPT(tiny_config(**MOD, pos="rope", block_size=12))).eval()
    idx = torch.randint(0, 64, (2, 5))
    a = generate(model, idx, 12, temperature=0, use_cache=True)  # slides past the context of 12
    b = generate(model, idx, 12, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_bf16_model_decodes():
    """A model cast to bf16 as bench.py and sampling.py decode it: the predictor's fp32 input is cast
    to its weights (a float input to bf16 weights raised in the H100 bench); the cached decode
    stays close to the full forward."""
    model = route_some(GPT(tiny_config(**MOD))).eval().to(torch.bfloat16)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        full, _ = model(idx, idx)
        cache = model.new_cache(2, 16)
        got = [model(idx[:, :8], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(8, 16)]
    assert got[0].dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat(got, 1).float(), full[:, 7:].float(), rtol=0.05, atol=0.05)


# ------------------------------------------------------------------------------------------------
# The predictor learns the top-k choice

def test_predictor_agrees_with_top_k_after_training():
    """A tiny model trained ~200 steps: its predictor matches training-time top-k on >= 95% of
    validation tokens (this run: 0.973 on seed 0), and eval-mode (predictor-routed) loss is close to
    the top-k-routed one."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT * 4])
    n = int(0.9 * len(data))
    T = 64
    model = GPT(tiny_config(n_layer=2, mod_every=2, mod_capacity=0.125, pos="rope", block_size=T))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(200):
        i = torch.randint(n - T - 1, (16,))
        x = torch.stack([data[j:j + T] for j in i])
        y = torch.stack([data[j + 1:j + T + 1] for j in i])
        _, loss = model(x, y)
        (loss + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad()
    starts = range(n, len(data) - T - 1, T)
    xv = torch.stack([data[j:j + T] for j in starts])
    yv = torch.stack([data[j + 1:j + T + 1] for j in starts])
    with torch.no_grad():
        _, loss_topk = model(xv, yv)  # train mode: top-k routing
        acc = model.stats()["blocks.1.predictor_acc"].item()
        model.eval()
        _, loss_pred = model(xv, yv)  # the causal routing
    assert acc >= 0.95, acc
    assert abs(loss_pred.item() - loss_topk.item()) < 0.05


# ------------------------------------------------------------------------------------------------
# FLOPs

def test_flops_count_capacity_times_the_block_plus_router():
    mod, cfg = routed_block(mod_capacity=0.25, mod_predictor_hidden=16)
    T = 32
    k = 8
    block = mod.block.flops_per_token(k)
    extra = 6 * (32 + 32 * 16 + 16)  # router w, predictor's two weight matrices
    assert mod.flops_per_token(T) == pytest.approx(0.25 * block + extra)
    # in a model: the dense model less 3/4 of each routed block, plus the routers
    dense = GPT(tiny_config(n_layer=4))
    routed = GPT(cfg)
    saved = sum(b.flops_per_token(T) - (0.25 * b.flops_per_token(k) + extra)
                for i, b in enumerate(dense.blocks) if i in (1, 3))
    assert routed.flops_per_token(T) == pytest.approx(dense.flops_per_token(T) - saved)
    assert routed.flops_per_token(T) < 0.75 * dense.flops_per_token(T)


# ------------------------------------------------------------------------------------------------
# Config

@pytest.mark.parametrize("kw, words", [
    (dict(mod_every=2, mod_capacity=0.0), "mod_capacity"),
    (dict(mod_every=2, mod_capacity=1.5), "mod_capacity"),
    (dict(mod_every=5), "mod_every"),
    (dict(mod_every=2, layers="GM"), "only attention layers"),
    (dict(mod_every=2, kv_share=2), "kv_share=1"),
])
def test_config_rejects_what_cannot_be_routed(kw, words):
    with pytest.raises(ValueError, match=words):
        GPTConfig(**{**dict(n_layer=4, n_head=4, n_embd=32), **kw})


def test_routed_layers():
    assert GPTConfig(n_layer=6, mod_every=2).routed_layers() == [1, 3, 5]
    assert GPTConfig(n_layer=6).routed_layers() == []
    assert GPTConfig(n_layer=4, layers="MG", mod_every=2).routed_layers() == [1, 3]


# ------------------------------------------------------------------------------------------------
# Mixture of mixtures

def test_mixture_of_mixtures_trains_and_samples(data_root, tmp_path, capsys):
    preset = PRESETS["mixture-of-mixtures"]
    assert preset["mod_every"] and preset["ffn"] == "moe" and preset["attn_experts"]
    assert "M" in preset["layers"]
    out = str(tmp_path / "mom")
    train.main(["--preset", "mixture-of-mixtures", "--data_dir", data_root, "--dataset", "tiny_char",
                "--out_dir", out, "--n_embd", "32", "--block_size", "32", "--batch_size", "4",
                "--max_iters", "6", "--eval_interval", "6", "--eval_iters", "1", "--log_interval", "3",
                "--device", "cpu"])
    sampling.main(["--out_dir", out, "--prompt", "ROMEO:", "--max-new-tokens", "40", "--num-samples", "1"])
    text = capsys.readouterr().out
    assert "ROMEO:" in text
    model, _ = sampling.load_model(out)
    assert sum(isinstance(b, MoD) and isinstance(b.block.mixer, MoA) for b in model.blocks) == 2


# ------------------------------------------------------------------------------------------------
# GPU: the fast kernels against the CPU reference

@pytest.mark.gpu
@gpu
def test_gpu_forward_and_decode_match_cpu(full_fp32):  # no TF32: routing matches the CPU's
    """The GPU kernels (SDPA's fused causal attention on the packed routed tokens, the cached
    decode) against the CPU reference, fp32, in both routing modes."""
    torch.manual_seed(0)
    model = route_some(GPT(tiny_config(**MOD, pos="rope", block_size=64)))
    idx = torch.randint(0, 64, (2, 64))
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with torch.no_grad():
            ref, _ = model.cpu()(idx, idx)
            got, _ = model.cuda()(idx.cuda(), idx.cuda())
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-4, atol=1e-4)
    model.cuda().eval()
    with torch.no_grad():
        full, _ = model(idx.cuda(), idx.cuda())
        cache = model.new_cache(2, 64)
        steps = [model(idx[:, :32].cuda(), cache=cache)[0]]
        steps += [model(idx[:, t:t + 1].cuda(), cache=cache)[0] for t in range(32, 64)]
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 31:], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@gpu
def test_gpu_bf16_compiled_training_step_matches_fp32(full_fp32, fresh_compile):
    """torch.compile + bf16 autocast (what train.py runs) against the eager fp32 reference: the
    loss within bf16 tolerance, and gradients that reach the router and the predictor."""
    torch.manual_seed(0)
    model = GPT(tiny_config(**MOD, pos="rope", block_size=128, n_embd=64)).cuda()
    idx = torch.randint(0, 64, (4, 128), device="cuda")
    _, ref = model(idx, idx)
    compiled = torch.compile(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = compiled(idx, idx)
        total = loss + model.aux_loss()
    torch.testing.assert_close(loss.float(), ref, rtol=1e-2, atol=1e-2)
    total.backward()
    for i in (1, 3):
        block = model.blocks[i]
        assert block.router_w.grad.abs().sum() > 0 and block.predictor[0].weight.grad.abs().sum() > 0
        assert torch.isfinite(block.router_w.grad).all()
