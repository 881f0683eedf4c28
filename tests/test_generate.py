"""gpt/generate.py: cached and uncached decoding give the same tokens at temperature 0, also past
block_size; top-k and top-p only ever pick allowed tokens; padded vocabulary ids are never sampled."""

import pytest
import torch

from conftest import tiny_config
from gpt.generate import generate, sample_next
from gpt.model import GPT


def make(**kw):
    return GPT(tiny_config(block_size=16, **kw)).eval()


@pytest.mark.parametrize("kw", [dict(), dict(pos="rope")])
@pytest.mark.parametrize("prompt_len", [1, 5, 20])  # 20 > block_size: the prompt is cut to its window
def test_cached_equals_uncached_greedy_past_block_size(kw, prompt_len):
    model = make(**kw)
    prompt = torch.randint(0, 64, (2, prompt_len))
    cached = generate(model, prompt, 40, temperature=0, use_cache=True)
    uncached = generate(model, prompt, 40, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + 40)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :prompt_len], prompt)
    # and greedy really is the argmax of the model over the last block_size tokens
    x = cached[:, :-1][:, -16:]
    assert torch.equal(cached[:, -1], model(x)[0][:, -1].argmax(-1))


def test_compiled_decoding_gives_the_eager_tokens():
    """generate(compile=True): the decode steps through torch.compile, past block_size (the cache
    fills and the window slides, so the step sees several cache lengths), the same greedy tokens."""
    model = make(pos="rope")
    prompt = torch.randint(0, 64, (2, 5))
    eager = generate(model, prompt, 30, temperature=0)
    assert torch.equal(generate(model, prompt, 30, temperature=0, compile=True), eager)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kw", [dict(pos="rope"), dict(pos="rope", attn="mla", kv_lora_rank=16, qk_rope_head_dim=4)])
def test_gpu_compiled_decoding_gives_the_eager_tokens(kw):
    """The same on CUDA (fp32, so greedy ties cannot flip), with MHA and with MLA's absorbed step."""
    torch._dynamo.reset()
    model = make(**kw).cuda()
    prompt = torch.randint(0, 64, (2, 5), device="cuda")
    eager = generate(model, prompt, 30, temperature=0)
    assert torch.equal(generate(model, prompt, 30, temperature=0, compile=True), eager)


def test_streaming_calls_back_each_token():
    model = make()
    seen = []
    out = generate(model, torch.zeros(1, 1, dtype=torch.long), 20, temperature=0, on_token=seen.append)
    assert len(seen) == 20 and all(t.shape == (1, 1) for t in seen)
    assert torch.equal(torch.cat(seen, dim=1), out[:, 1:])


def draws(logits, n=2000, **kw):
    """n samples from sample_next, as a set of token ids (batch of n identical rows)."""
    g = torch.Generator().manual_seed(0)
    return set(sample_next(logits.expand(n, -1), generator=g, **kw).flatten().tolist())


def test_top_k_only_picks_the_k_best():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.5, 0.0, 2.9, 1.0, -2.0]])
    assert draws(logits, top_k=1) == {1}
    assert draws(logits, top_k=3) == {1, 3, 5}  # all three appear, nothing else does
    assert draws(logits, top_k=3, temperature=5.0) == {1, 3, 5}
    assert draws(logits, top_k=100) == set(range(8))  # k past the vocabulary: no filter


def test_top_p_only_picks_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log()
    assert draws(logits, top_p=0.45) == {1}  # the top token alone already covers 0.45
    assert draws(logits, top_p=0.7) == {1, 3}  # 0.5 < 0.7 <= 0.8
    assert draws(logits, top_p=0.9) == {1, 3, 2}
    assert draws(logits, top_p=1.0) == {0, 1, 2, 3}
    assert draws(logits, top_p=0.9, top_k=2) == {1, 3}  # both filters apply


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, 11)
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1, keepdim=True))


@pytest.mark.parametrize("use_cache", [True, False])
def test_padded_vocabulary_never_sampled(use_cache):
    """The model's vocabulary (64) is padded past the tokenizer's (50); make the padding ids the most
    likely by far: they still never come out."""
    model = make(bias=True)
    with torch.no_grad():  # final hidden state = ln_f.bias = ones, whatever the input
        model.ln_f.weight.zero_()
        model.ln_f.bias.fill_(1.0)
        model.wte.weight[50:] = 1.0  # tied head: logit 32 for ids 50..63, about 0 for the others
    prompt = torch.randint(0, 50, (8, 3))
    assert model(prompt)[0][:, -1].argmax(-1).min() >= 50  # unconstrained, padding would win
    for kw in (dict(temperature=0), dict(temperature=1.0), dict(temperature=2.0, top_k=20, top_p=0.99)):
        out = generate(model, prompt, 30, use_cache=use_cache, vocab_size=50,
                       generator=torch.Generator().manual_seed(1), **kw)
        assert out.max() < 50, kw
