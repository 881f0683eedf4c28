"""gpt/model.py: the model is causal, its KV cache gives the logits of the full forward, its
residual stream keeps the dtype asked for, and its parameter and FLOP counts equal the closed forms
written out here."""

import pytest
import torch

from conftest import tiny_config
from gpt.config import GPTConfig
from gpt.model import GPT


VARIANTS = {
    "learned": dict(),
    "rope-rmsnorm-bias": dict(pos="rope", norm="rmsnorm", bias=True, activation="relu2"),
}


def all_logits(model, idx, cache=None):
    """Logits at every position, (B, T, V): the forward returns them all when given targets."""
    logits, _ = model(idx, targets=torch.zeros_like(idx), cache=cache)
    return logits


def make(**kw):
    return GPT(tiny_config(**kw)).eval()


# ------------------------------------------------------------------------------------------------
# The residual stream's dtype

STREAM_VARIANTS = {  # every kind of layer: each must hand the stream on in the dtype it got
    "attention": dict(),
    "local-mamba-linear": dict(layers="LMH", n_layer=3, window=4, mamba_d_state=8, mamba_head_dim=16,
                               mamba_chunk_size=8),
    "mla": dict(pos="rope", attn="mla", kv_lora_rank=16, qk_rope_head_dim=8),
    "moe": dict(n_layer=4, ffn="moe", n_expert=4, n_expert_active=2, moe_every=2),
    "peer": dict(ffn="peer", peer_keys=16),
    "mod": dict(mod_capacity=0.5, mod_every=2),
}


@pytest.mark.parametrize("variant", STREAM_VARIANTS)
def test_residual_stream_dtype(variant):
    """Under bf16 autocast the stream between blocks is fp32 by default and bf16 with
    residual_fp32=False, through every kind of layer; the logits then agree to bf16 precision and
    the gradients stay finite. Without autocast the flag changes nothing."""
    torch.manual_seed(0)
    kw = STREAM_VARIANTS[variant]
    ref = GPT(tiny_config(**kw))
    low = GPT(tiny_config(residual_fp32=False, **kw))
    low.load_state_dict(ref.state_dict())
    idx = torch.randint(0, ref.config.vocab_size, (2, 16))
    seen = {ref: [], low: []}  # the dtype each block hands on
    for model in (ref, low):
        for block in model.blocks:
            block.register_forward_hook(lambda mod, args, out, m=model: seen[m].append(out.dtype))
    assert torch.equal(all_logits(low, idx), all_logits(ref, idx))  # no autocast: the same model
    for dtypes in seen.values():
        dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_ref, _ = ref(idx, targets=idx)
        logits, loss = low(idx, targets=idx)
    assert seen[ref] == [torch.float32] * len(ref.blocks)
    assert seen[low] == [torch.bfloat16] * len(low.blocks)
    rel = ((logits.float() - logits_ref.float()).norm() / logits_ref.float().norm()).item()
    assert rel < 2e-2, rel
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in low.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------------
# Causality and the KV cache

@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant):
    """Changing token t changes no logit before t (and does change the logits from t on)."""
    model = make(**VARIANTS[variant])
    idx = torch.randint(0, 64, (2, 32))
    base = all_logits(model, idx)
    for t in (0, 7, 31):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 64
        out = all_logits(model, changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert (out[:, t] - base[:, t]).abs().max() > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_equals_full_forward(variant):
    model = make(**VARIANTS[variant])
    idx = torch.randint(0, 64, (3, 32))
    full = all_logits(model, idx)  # (B, T, V)

    # prefill 10 tokens, then one token at a time
    cache = model.new_cache(3)
    steps = [all_logits(model, idx[:, :10], cache)] + [all_logits(model, idx[:, t:t + 1], cache)
                                                       for t in range(10, 32)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.seen == 32

    # chunked prefill of uneven sizes
    cache = model.new_cache(3)
    bounds = [0, 5, 6, 13, 24, 32]
    chunks = [all_logits(model, idx[:, a:b], cache) for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)

    # without targets, only the last position comes back, and it is the same
    cache = model.new_cache(3)
    model(idx[:, :31], cache=cache)
    last, loss = model(idx[:, 31:], cache=cache)
    assert loss is None and last.shape == (3, 1, 64)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)


def test_context_limits():
    model = make()
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))
    cache = model.new_cache(1)
    model(torch.zeros(1, 30, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


# ------------------------------------------------------------------------------------------------
# Counting

def closed_form_params(c):
    """Parameters of the baseline GPT, written out:
        token embedding V*C (+ learned positions block_size*C);
        per layer: two norms, attention W_qkv (C x 3C) and W_o (C x C), MLP W_1 (C x H), W_2 (H x C),
        with biases 3C + C + H + C when bias=True;
        a final norm; the head V*C only when it is not tied to the token embedding.
    A LayerNorm has a weight C (+ a bias C when bias=True); an RMSNorm a weight C only."""
    C, V, L, H = c.n_embd, c.vocab_size, c.n_layer, int(c.mlp_ratio * c.n_embd)
    b = int(c.bias)
    norm = C + (C * b if c.norm == "layernorm" else 0)
    attention = 3 * C * C + 3 * C * b + C * C + C * b
    mlp = C * H + H * b + H * C + C * b
    embeddings = V * C + (c.block_size * C if c.pos == "learned" else 0)
    head = 0 if c.tie_weights else V * C
    return embeddings + L * (2 * norm + attention + mlp) + norm + head


@pytest.mark.parametrize("kw", [
    dict(),
    dict(bias=True),
    dict(tie_weights=False),
    dict(pos="rope", norm="rmsnorm", bias=True, mlp_ratio=2.5),
    dict(pos="rope", tie_weights=False, n_layer=3, activation="relu2"),
])
def test_param_count_closed_form(kw):
    c = tiny_config(**kw)
    model = GPT(c)
    assert model.num_params() == closed_form_params(c)
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    emb = (c.block_size * c.n_embd if c.pos == "learned" else 0) + (0 if c.tie_weights else c.vocab_size * c.n_embd)
    assert model.num_params(non_embedding=True) == closed_form_params(c) - emb
    assert model.active_params() == model.num_params()


def test_closed_form_gives_gpt2_small():
    """The formula itself, against GPT-2 small as released (biases, vocabulary 50257): 124,439,808
    parameters. (The model is checked against the formula above, on configs small enough to build.)"""
    c = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, bias=True)
    assert closed_form_params(c) == 124_439_808


@pytest.mark.parametrize("kw", [dict(), dict(tie_weights=False, mlp_ratio=3.0, pos="rope")])
def test_flops_per_token_hand_formula(kw):
    """6 FLOPs per matmul weight (forward 2, backward 4), PaLM appendix B, plus the attention term
    12 * n_layer * n_embd * T (QK^T and AV, forward and backward); embedding lookups, norms and
    biases are not counted; the head counts once whether tied or not."""
    c = tiny_config(**kw)
    model = GPT(c)
    C, V, L, H = c.n_embd, c.vocab_size, c.n_layer, int(c.mlp_ratio * c.n_embd)
    for T in (c.block_size, 7):
        expect = 6 * (V * C + L * (4 * C * C + 2 * C * H)) + 12 * L * C * T
        assert model.flops_per_token(T) == expect
    assert model.flops_per_token() == model.flops_per_token(c.block_size)
