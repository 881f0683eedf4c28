"""Multi-head latent attention (gpt/mla.py): the absorbed decoding path against a naive expanded
oracle written here from the equations, the compressed cache (its size and that it holds the
*normalised* latent), causality, cached decoding against the full forward, the closed-form
parameter and FLOPs counts, the config switch; and, on a GPU, the bf16 paths (expanded through SDPA, absorbed) against fp32."""

import math

import pytest
import torch

from conftest import TEXT, tiny_config
from gpt.config import GPTConfig
from gpt.generate import generate
from gpt.mla import LatentCache, LatentRingCache, MultiHeadLatentAttention, _attend_padded
from gpt.model import GPT


# small but with every size different, so a mixed-up dimension cannot pass by accident
DIMS = dict(kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=10)


def mla_config(**kw):
    return tiny_config(**{"attn": "mla", "pos": "rope", **DIMS, **kw})


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def random_module(config, seed=0):
    """An fp64 MLA layer with every weight random and of order one (norm gains included), so that
    no path can hide behind small or all-ones weights."""
    torch.manual_seed(seed)
    m = MultiHeadLatentAttention(config).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]) if p.dim() == 2 else 1.0)
    return m


def naive_mla(m, x, pos):
    """The oracle: DeepSeek-V2's equations, one head at a time, with every key and value expanded.
    Reads the module's weights only (and its rotary tables, shared with rope.py); a local layer's
    window limits each query to itself and the window - 1 tokens before it."""
    B, T, C = x.shape
    nh, r, dn, dr, dv = m.n_head, m.kv_lora_rank, m.nope_dim, m.rope_dim, m.v_dim
    if m.q_lora_rank:
        c_q = x @ m.wq_a.weight.T
        c_q = c_q / torch.sqrt(c_q.pow(2).mean(-1, keepdim=True) + m.q_norm.eps) * m.q_norm.weight
        q_all = c_q @ m.wq_b.weight.T
    else:
        q_all = x @ m.wq.weight.T
    q_all = q_all.view(B, T, nh, dn + dr)
    a = x @ m.wkv_a.weight.T  # (B, T, r + dr)
    c = a[..., :r]
    c_kv = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + m.kv_norm.eps) * m.kv_norm.weight
    k_rope = m.rotary(a[..., r:].unsqueeze(1), pos).squeeze(1)  # (B, T, dr)
    w = m.wkv_b.weight  # (nh*(dn+dv), r)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    if m.window is not None:
        causal = causal & ~torch.tril(causal, diagonal=-m.window)
    heads = []
    for h in range(nh):
        w_h = w[h * (dn + dv):(h + 1) * (dn + dv)]
        k_h, v_h = c_kv @ w_h[:dn].T, c_kv @ w_h[dn:].T  # (B, T, dn), (B, T, dv)
        q_h = q_all[:, :, h, :dn]
        q_hr = m.rotary(q_all[:, :, h, dn:].unsqueeze(1), pos).squeeze(1)  # (B, T, dr)
        s = (q_h @ k_h.transpose(1, 2) + q_hr @ k_rope.transpose(1, 2)) / math.sqrt(dn + dr)
        s = s.masked_fill(~causal, float("-inf"))
        heads.append(s.softmax(-1) @ v_h)  # (B, T, dv)
    return torch.cat(heads, dim=-1) @ m.c_proj.weight.T  # (B, T, C)


def run(m, x, absorb, cache=None):
    m.absorb = absorb
    try:
        return m(x, torch.arange(x.shape[1], device=x.device), cache)
    finally:
        m.absorb = None


# ------------------------------------------------------------------------------------------------
# absorbed == expanded == the naive oracle

@pytest.mark.parametrize("q_lora_rank", [0, 16])
@pytest.mark.parametrize("dims", [DIMS, dict(kv_lora_rank=8, qk_nope_head_dim=2, qk_rope_head_dim=2,
                                             v_head_dim=14)], ids=["dqk<dv", "dqk>dv"])
def test_absorbed_equals_expanded_random_weights(q_lora_rank, dims):
    m = random_module(mla_config(q_lora_rank=q_lora_rank, **dims))
    x = torch.randn(3, 17, 32, dtype=torch.float64)
    ref = naive_mla(m, x, torch.arange(17))
    assert rel_err(run(m, x, absorb=False), ref) < 1e-10
    assert rel_err(run(m, x, absorb=True), ref) < 1e-10


def train_tiny(config, steps=30):
    """A few AdamW steps of a tiny model on the characters of the conftest text (CPU, fp32)."""
    torch.manual_seed(0)
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(ch) for ch in TEXT])
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    T = config.block_size
    losses = []
    for _ in range(steps):
        i = torch.randint(0, len(data) - T - 1, (8,))
        x = torch.stack([data[j:j + T] for j in i])
        y = torch.stack([data[j + 1:j + T + 1] for j in i])
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, data, losses


@pytest.fixture(scope="module")
def trained():
    model, data, losses = train_tiny(mla_config(q_lora_rank=16))
    assert losses[-1] < losses[0] - 0.5, losses  # it did learn something
    return model.double().eval(), data


def test_absorbed_equals_expanded_trained_model(trained):
    model, data = trained
    idx = data[:2 * 24].view(2, 24)
    logits = {}
    for absorb in (False, True):
        for b in model.blocks:
            b.mixer.absorb = absorb
        logits[absorb], _ = model(idx, idx)
    for b in model.blocks:
        b.mixer.absorb = None
    assert rel_err(logits[True], logits[False]) < 1e-10
    # and layer by layer against the oracle, on the trained weights
    m = model.blocks[0].mixer
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    assert rel_err(run(m, x, absorb=True), naive_mla(m, x, torch.arange(24))) < 1e-10


def test_decode_with_cache_equals_full_forward(trained):
    """Prefill 9 tokens (expanded, into an empty cache), then one token at a time and a chunk of 5
    (absorbed, against the cache): the logits equal the full, uncached forward's at every position."""
    model, data = trained
    idx = data[100:100 + 2 * 30].view(2, 30)
    full, _ = model(idx, idx)  # (B, T, V)
    cache = model.new_cache(2, 30)
    prefill, chunk = idx[:, :9].contiguous(), idx[:, 25:].contiguous()
    got = [model(prefill, prefill, cache=cache)[0]]  # targets only to get every position's logits
    for t in range(9, 25):
        got.append(model(idx[:, t:t + 1], cache=cache)[0])
    got.append(model(chunk, chunk, cache=cache)[0])
    assert cache.seen == 30
    assert rel_err(torch.cat(got, dim=1), full) < 1e-10


def test_generate_same_tokens_with_and_without_cache(trained):
    model, data = trained
    prompt = data[:2 * 5].view(2, 5)
    a = generate(model, prompt, 20, temperature=0, use_cache=True)
    b = generate(model, prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_decoding_against_a_cache_is_absorbed_and_prefill_expanded(monkeypatch):
    """The automatic choice: expanded into an empty cache and without one; absorbed once the
    cache holds tokens."""
    m = random_module(mla_config())
    calls = []
    for name in ("expanded", "absorbed"):
        method = getattr(m, name)
        monkeypatch.setattr(m, name, lambda *a, _f=method, _n=name, **k: calls.append(_n) or _f(*a, **k))
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    m(x, torch.arange(6))
    cache = m.new_cache(1, 8, "cpu", torch.float64)
    m(x[:, :4], torch.arange(4), cache)
    m(x[:, 4:5], torch.arange(4, 5), cache)
    m(x[:, 5:6], torch.arange(5, 6), cache)
    assert calls == ["expanded", "expanded", "absorbed", "absorbed"]


@pytest.mark.parametrize("window", [None, 4])
def test_absorbed_decoding_reads_the_cache_in_place(window):
    """A decoding step's two matrix products (scores, then the weighted sum of latents) read the
    cache's own memory: nothing copied or concatenated. One token against a global layer's cache
    needs no mask; a local layer's ring applies one (empty slots, the window)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):  # records every aten op with the storages of its tensor arguments
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ptrs = [a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)]
            self.ops.append((func.__name__.split(".")[0], ptrs))
            return func(*args, **(kwargs or {}))

    m = random_module(mla_config())
    m.window = window
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    cache = m.new_cache(2, 6, "cpu", x.dtype)
    m(x[:, :5], torch.arange(5), cache)  # prefill (expanded)
    with Ops() as rec:
        m(x[:, 5:], torch.arange(5, 6), cache)
    cache_ptr = cache.k.untyped_storage().data_ptr()
    readers = [op for op, ptrs in rec.ops if cache_ptr in ptrs]
    assert readers.count("bmm") == 2, readers  # scores and values, straight from the cache
    assert not {"cat", "clone", "contiguous", "_to_copy"} & set(readers), readers
    assert ("masked_fill" in [op for op, _ in rec.ops]) == (window is not None)


# ------------------------------------------------------------------------------------------------
# the cache

def assert_caches_normalised_latent(m, x):
    """What a prefill writes into the cache is RMSNorm(x W_dkv) (with its gain) and the rotated
    shared key, computed here from the weights."""
    B, T, _ = x.shape
    cache = m.new_cache(B, T + 3, "cpu", x.dtype)
    m(x, torch.arange(T), cache)
    r = m.kv_lora_rank
    a = x @ m.wkv_a.weight.T  # (B, T, r + dr)
    c = a[..., :r]
    normalised = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + m.kv_norm.eps) * m.kv_norm.weight
    rotated = m.rotary(a[..., r:].unsqueeze(1), torch.arange(T)).squeeze(1)
    torch.testing.assert_close(cache.k[:, 0, :T, :r], normalised, rtol=1e-12, atol=1e-12)  # c_kv
    torch.testing.assert_close(cache.k[:, 0, :T, r:], rotated, rtol=1e-12, atol=1e-12)  # k^R
    assert not cache.k[:, :, T:].any() and cache.v.numel() == 0  # nothing past the tokens seen, no values


def test_cache_holds_the_normalised_latent():
    m = random_module(mla_config())
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    assert_caches_normalised_latent(m, x)


def test_the_cache_check_catches_caching_before_the_norm():
    """A version that caches x W_dkv and normalises on reading gives the same outputs (so only a
    look into the cache can tell), and the check above fails on it."""

    class CachesBeforeNorm(MultiHeadLatentAttention):
        def latent(self, x, pos):
            c_kv, k_rope = self.wkv_a(x).unsqueeze(1).split([self.kv_lora_rank, self.rope_dim], dim=-1)
            return torch.cat([c_kv, self.rotary(k_rope, pos)], dim=-1)

        def normalise(self, kv):
            c_kv, k_rope = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
            return torch.cat([self.kv_norm(c_kv), k_rope], dim=-1)

        def expanded(self, q, q_rope, kv, *a, **k):
            return super().expanded(q, q_rope, self.normalise(kv), *a, **k)

        def absorbed(self, q, q_rope, kv, *a, **k):
            return super().absorbed(q, q_rope, self.normalise(kv), *a, **k)

    good = random_module(mla_config())
    bad = CachesBeforeNorm(mla_config()).double()
    bad.load_state_dict(good.state_dict())
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    cache_good, cache_bad = good.new_cache(2, 7, "cpu", x.dtype), bad.new_cache(2, 7, "cpu", x.dtype)
    for t in range(7):  # decode token by token: same outputs
        y_good = good(x[:, t:t + 1], torch.arange(t, t + 1), cache_good)
        y_bad = bad(x[:, t:t + 1], torch.arange(t, t + 1), cache_bad)
        torch.testing.assert_close(y_bad, y_good, rtol=1e-10, atol=1e-12)
    with pytest.raises(AssertionError):
        assert_caches_normalised_latent(bad, x)


def test_cache_size_is_latent_plus_rope_per_token_per_layer():
    config = mla_config(n_layer=3)
    model = GPT(config)
    r, dr = config.mla_dims()["kv_lora_rank"], config.mla_dims()["qk_rope_head_dim"]
    mha = GPT(tiny_config(n_layer=3, pos="rope"))
    for dtype in (torch.float32, torch.bfloat16):
        cache = model.new_cache(batch_size=5, max_len=16, dtype=dtype)
        # one row [c_kv ; k^R] per token, and no values: they are the rows' first r numbers
        assert all(isinstance(c, LatentCache) for c in cache)
        assert all(c.k.shape == (5, 1, 16, r + dr) and c.v.shape == (5, 1, 16, 0) for c in cache)
        per_token_per_layer = cache.nbytes() / (5 * 16 * config.n_layer * dtype.itemsize)
        assert per_token_per_layer == r + dr == 16
        # against MHA's 2 * n_embd numbers per token per layer
        assert mha.new_cache(5, 16, dtype=dtype).nbytes() == cache.nbytes() * 2 * 32 // 16


def test_cache_overflow_is_refused():
    m = random_module(mla_config())
    cache = m.new_cache(1, 4, "cpu", torch.float64)
    with pytest.raises(ValueError, match="cache full"):
        m(torch.randn(1, 5, 32, dtype=torch.float64), torch.arange(5), cache)


# ------------------------------------------------------------------------------------------------
# causality

@pytest.mark.parametrize("absorb", [False, True])
def test_causal(absorb):
    m = random_module(mla_config(q_lora_rank=8))
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 7:] = torch.randn(2, 5, 32, dtype=torch.float64)  # change the future of token 6
    y, y2 = run(m, x, absorb), run(m, x2, absorb)
    assert torch.equal(y[:, :7], y2[:, :7])
    assert not torch.allclose(y[:, 7:], y2[:, 7:])


def test_causal_gradients():
    model = GPT(mla_config())
    idx = torch.randint(0, 64, (1, 10))
    emb = model.wte(idx).detach().requires_grad_(True)
    x = emb
    for b in model.blocks:
        x = b(x, torch.arange(10))
    x[0, 4].sum().backward()
    assert emb.grad[0, 5:].abs().sum() == 0 and emb.grad[0, :5].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# local (L) layers and cross-layer sharing of the latent

def test_local_layer_absorbed_equals_expanded_and_oracle():
    config = mla_config(q_lora_rank=8)
    m = random_module(config)
    m.window = 5
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    ref = naive_mla(m, x, torch.arange(13))
    assert rel_err(run(m, x, absorb=False), ref) < 1e-10
    assert rel_err(run(m, x, absorb=True), ref) < 1e-10


@pytest.mark.parametrize("layers, kv_share", [("LG", 1), ("G", 2), ("LLGG", 2)])
def test_decode_equals_full_forward_local_and_shared(layers, kv_share):
    """Local layers keep a ring of `window` latents; with kv_share the later layers of a group have
    no latent projection and read the first layer's latents (and cache)."""
    torch.manual_seed(0)
    config = mla_config(layers=layers, kv_share=kv_share, window=6, n_layer=4)
    model = GPT(config).double().eval()
    idx = torch.randint(0, 64, (2, 20))
    full, _ = model(idx, idx)
    cache = model.new_cache(2, 20)
    prefill = idx[:, :7].contiguous()
    got = [model(prefill, prefill, cache=cache)[0]]
    got += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(7, 20)]
    assert rel_err(torch.cat(got, dim=1), full) < 1e-10
    kinds = config.layer_kinds()
    for i, block in enumerate(model.blocks):
        reads = block.mixer.reads_kv
        assert hasattr(block.mixer, "wkv_a") != reads
        assert isinstance(cache[i], LatentRingCache if kinds[i] == "L" else LatentCache)
        assert (cache[i] is cache[i - 1]) == reads
    # bytes: r + dr fp64 numbers per token and batch row, over 20 tokens (global) or the window of
    # 6 (local, plus the ring's 6 int64 positions), once per group of kv_share layers
    owners = [k for i, k in enumerate(kinds) if not model.blocks[i].mixer.reads_kv]
    assert len(owners) == 4 // kv_share
    expected = sum(2 * 20 * 16 * 8 if k == "G" else 2 * 6 * 16 * 8 + 6 * 8 for k in owners)
    assert cache.nbytes() == expected


# ------------------------------------------------------------------------------------------------
# counts

def mla_params(C, nh, q_lora_rank, r, dn, dr, dv, bias):
    qk = nh * (dn + dr)
    if q_lora_rank:
        q = C * q_lora_rank + q_lora_rank + q_lora_rank * qk + bias * (q_lora_rank + qk)
    else:
        q = C * qk + bias * qk
    return (q + C * (r + dr) + bias * (r + dr) + r  # W_dkv, W_kr (+ bias), the latent's norm gain
            + r * nh * (dn + dv)  # W_uk, W_uv: no bias
            + nh * dv * C + bias * C)  # W_o


@pytest.mark.parametrize("q_lora_rank", [0, 24])
@pytest.mark.parametrize("bias", [False, True])
def test_param_count_closed_form(q_lora_rank, bias):
    config = mla_config(q_lora_rank=q_lora_rank, bias=bias)
    m = MultiHeadLatentAttention(config)
    expected = mla_params(32, 4, q_lora_rank, 12, 6, 4, 10, bias)
    assert sum(p.numel() for p in m.parameters()) == expected
    # a later layer of a KV-sharing group has no W_dkv, W_kr or latent norm
    reader = MultiHeadLatentAttention(config, reads_kv=True)
    assert sum(p.numel() for p in reader.parameters()) == expected - (32 * 16 + bias * 16 + 12)
    # the whole model: MHA's attention parameters swapped for MLA's, nothing else changes
    mha_attn = 4 * 32 * 32 + bias * 4 * 32
    assert GPT(config).num_params() == GPT(tiny_config(bias=bias, pos="rope")).num_params() \
        + config.n_layer * (expected - mha_attn)


def test_default_sizes_follow_the_head_width():
    d = GPTConfig(attn="mla").mla_dims()  # GPT-2 small: 12 heads of 64
    assert d == dict(q_lora_rank=0, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                     v_head_dim=64)
    m = MultiHeadLatentAttention(GPTConfig(attn="mla"))
    assert m.scale == 1 / math.sqrt(64 + 32)


def test_flops_per_token_formula():
    config = mla_config(q_lora_rank=24)
    m = MultiHeadLatentAttention(config)
    C, nh, q, r, dn, dr, dv, T = 32, 4, 24, 12, 6, 4, 10, 32
    weights = C * q + q * nh * (dn + dr) + C * (r + dr) + r * nh * (dn + dv) + nh * dv * C
    assert m.flops_per_token(T) == 6 * weights + 6 * nh * (dn + dr + dv) * T
    # with dqk = dv = head_dim the attention term is PaLM's 12 * n_head * head_dim * T, as for MHA
    same = MultiHeadLatentAttention(mla_config(qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=8))
    mha = GPT(tiny_config()).blocks[0].mixer
    assert same.flops_per_token(T) - 6 * sum(p.numel() for p in same.parameters() if p.dim() == 2) \
        == mha.flops_per_token(T) - 6 * sum(p.numel() for p in mha.parameters() if p.dim() == 2)
    model = GPT(config)
    assert model.flops_per_token(T) == 6 * model.lm_head.weight.numel() + sum(
        m.flops_per_token(T) + b.ffn.flops_per_token(T) for b, m in
        ((b, b.mixer) for b in model.blocks))


# ------------------------------------------------------------------------------------------------
# the query path and the config

def test_q_lora_rank_zero_is_a_plain_projection():
    m = random_module(mla_config(q_lora_rank=0))
    assert not any(hasattr(m, n) for n in ("wq_a", "q_norm", "wq_b"))
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    q, _ = m.queries(x, torch.arange(5))  # (B, nh, T, dn)
    plain = (x @ m.wq.weight.T).view(2, 5, 4, 10)[..., :6].transpose(1, 2)
    torch.testing.assert_close(q, plain, rtol=0, atol=0)
    low_rank = MultiHeadLatentAttention(mla_config(q_lora_rank=8))
    assert low_rank.wq_a.weight.shape == (8, 32) and low_rank.wq_b.weight.shape == (4 * 10, 8)
    assert not hasattr(low_rank, "wq")


def test_config_checks():
    with pytest.raises(ValueError, match="attn"):
        tiny_config(attn="gqa")
    with pytest.raises(ValueError, match="only apply to attn='mla'"):
        tiny_config(kv_lora_rank=16)
    with pytest.raises(ValueError, match="even"):
        mla_config(qk_rope_head_dim=3)
    with pytest.raises(ValueError, match=">= 0"):
        mla_config(q_lora_rank=-1)


@pytest.mark.parametrize("dqk, dv", [(12, 8), (6, 10)])
@pytest.mark.parametrize("window", [None, 4])
def test_padding_to_equal_head_dims_changes_nothing(dqk, dv, window):
    """What a GPU runs (zero-padded to one head size, q rescaled) equals the unpadded attention."""
    q, k = torch.randn(2, 3, 9, dqk, dtype=torch.float64), torch.randn(2, 3, 9, dqk, dtype=torch.float64)
    v = torch.randn(2, 3, 9, dv, dtype=torch.float64)
    ref = _attend_padded(q, k, v, None, None, 0.0, window, pad=False)
    assert ref.shape == (2, 3, 9, dv)
    assert rel_err(_attend_padded(q, k, v, None, None, 0.0, window, pad=True), ref) < 1e-12


# ------------------------------------------------------------------------------------------------
# GPU: the bf16 flash path (padded to equal head dims) against fp32

GPU_DIMS = [dict(), dict(qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=64)]


def gpu_config(**kw):
    return GPTConfig(**{**dict(vocab_size=256, block_size=256, n_layer=2, n_head=8, n_embd=512, attn="mla",
                               pos="rope"), **kw})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dims", GPU_DIMS, ids=["dqk>dv", "dqk<dv"])
def test_gpu_bf16_sdpa_matches_fp32(dims):
    """The expanded path through SDPA's flash kernels (padded to one head size) and the absorbed path,
    in bf16 on the GPU and under autocast as train.py runs it, against fp32 on the CPU."""
    torch.manual_seed(0)
    ref = MultiHeadLatentAttention(gpu_config(q_lora_rank=128, **dims))
    x = torch.randn(2, 256, 512)
    y_ref = run(ref, x, absorb=False)  # fp32 on the CPU
    m = MultiHeadLatentAttention(gpu_config(q_lora_rank=128, **dims)).cuda().bfloat16()
    m.load_state_dict(ref.state_dict())
    xc = x.cuda().bfloat16()
    for absorb in (False, True):
        y = run(m, xc, absorb)
        assert y.dtype == torch.bfloat16
        assert rel_err(y.float().cpu(), y_ref) < 1e-2, absorb
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y_amp = run(ref.cuda(), x.cuda(), absorb=False)
    assert rel_err(y_amp.float().cpu(), y_ref) < 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dims", GPU_DIMS, ids=["dqk>dv", "dqk<dv"])
def test_gpu_fp32_matches_cpu(dims, full_fp32):
    torch.manual_seed(0)
    ref = MultiHeadLatentAttention(gpu_config(**dims))
    x = torch.randn(2, 256, 512)
    m = MultiHeadLatentAttention(gpu_config(**dims)).cuda()
    m.load_state_dict(ref.state_dict())
    for absorb in (False, True):
        assert rel_err(run(m, x.cuda(), absorb).cpu(), run(ref, x, absorb)) < 1e-4, absorb


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float32, 1e-4)])
@pytest.mark.parametrize("window", [None, 64])
def test_gpu_absorbed_decoding_matches_cpu(dtype, tol, window, full_fp32):
    """At the benchmark's sizes (12 heads, r = 256, d_r = 32: queries and keys 288 wide, values 256)
    the absorbed decoding steps on the GPU, global (no mask) and local (the ring's mask), give the
    outputs of the same decoding in fp32 on the CPU."""
    torch.manual_seed(0)
    config = gpu_config(n_head=12, n_embd=768, kv_lora_rank=256, qk_rope_head_dim=32)
    ref = MultiHeadLatentAttention(config, window=window)
    m = MultiHeadLatentAttention(config, window=window).to("cuda", dtype)
    m.load_state_dict(ref.state_dict())
    x = torch.randn(4, 200, 768)

    def decode(m, x):
        cache = m.new_cache(4, 200, x.device, x.dtype)
        m(x[:, :150], torch.arange(150, device=x.device), cache)  # prefill (expanded)
        y = [m(x[:, t:t + 1], torch.arange(t, t + 1, device=x.device), cache) for t in range(150, 200)]
        return torch.cat(y, dim=1).float().cpu()  # (B, 50, C)

    with torch.no_grad():
        got, want = decode(m, x.to("cuda", dtype)), decode(ref, x)
    assert rel_err(got, want) < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_cached_decode_matches_full_forward():
    """generate()'s path on a GPU in bf16: prefill (expanded) then absorbed decoding against the
    latent cache, against the uncached full forward."""
    torch.manual_seed(0)
    model = GPT(gpu_config(layers="GL", window=64)).cuda().bfloat16().eval()
    idx = torch.randint(0, 256, (4, 200), device="cuda")
    with torch.no_grad():
        full, _ = model(idx, idx)
        cache = model.new_cache(4, 200)
        prefill = idx[:, :150].contiguous()
        got = [model(prefill, prefill, cache=cache)[0]]
        got += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(150, 200)]
    assert rel_err(torch.cat(got, dim=1).float(), full.float()) < 1e-2
