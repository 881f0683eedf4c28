"""Linear attention (issue 14): the Hedgehog feature map; the LoLCATs window + linear hybrid in its
reference, parallel and recurrent forms (a window covering the sequence is softmax attention exactly);
the H layer in a GPT (decoding equals the full forward, causality, memory flat in the context); LoRA
surgery; and linearizing a checkpoint of train.py (attention transfer lowers each layer's MSE >= 10x;
linearize.py's output samples with sampling.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import linearize
import train
from conftest import tiny_config
from gpt import checkpoint, lora
from gpt import linear_attention as la
from gpt.attention import CausalSelfAttention
from gpt.config import GPTConfig
from gpt.generate import generate
from gpt.loader import Loader, open_split
from gpt.model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qkv(B=2, nh=3, T=37, hs=8, f=8, seed=0):
    """Random q, k, v (fp64), their Hedgehog features from one random map, and a γ per head."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, nh, T, hs, generator=g, dtype=torch.float64) for _ in range(3))
    fmap = la.HedgehogFeatureMap(nh, hs, f).double()
    with torch.no_grad():
        fmap.weight.add_(0.3 * torch.randn(fmap.weight.shape, generator=g, dtype=torch.float64))
    gamma = torch.rand(nh, generator=g, dtype=torch.float64)
    return q, k, v, fmap(q).detach(), fmap(k).detach(), gamma


def h_model(layers="H", linear_window=5, **kw):
    """A tiny fp64 GPT with H layers, its weights jittered off their init."""
    model = GPT(tiny_config(layers=layers, linear_window=linear_window, **kw)).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# ------------------------------------------------------------------------------------------------
# The feature map and the forms

def test_feature_map_is_two_softmaxes_from_the_identity():
    fmap = la.HedgehogFeatureMap(n_head=2, head_dim=8, features=8)
    x = torch.randn(3, 2, 5, 8)
    phi = fmap(x)
    assert phi.shape == (3, 2, 5, 16) and (phi > 0).all()
    torch.testing.assert_close(phi[..., :8], x.softmax(-1))  # W = I, b = 0 at first
    torch.testing.assert_close(phi[..., 8:], (-x).softmax(-1))
    assert la.HedgehogFeatureMap(2, 8, 4)(x).shape == (3, 2, 5, 8)  # f < head_dim: W is a slice of I


@pytest.mark.parametrize("form", ["reference", "parallel"])
def test_window_covering_the_sequence_is_softmax_attention(form):
    q, k, v, fq, fk, gamma = qkv(T=37)
    attend = la.hybrid_attention if form == "reference" else la.hedgehog_attend
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    for window in (37, 64):
        torch.testing.assert_close(attend(q, k, v, fq, fk, window, gamma), want, rtol=1e-12, atol=1e-12)


def test_h_layer_with_a_covering_window_is_the_softmax_layer_it_came_from():
    cfg = tiny_config(layers="H", linear_window=32, pos="rope", n_kv_head=2, qk_norm=True)
    softmax = CausalSelfAttention(cfg).double()
    linear = la.LinearAttention(cfg).double()
    missing = linear.load_state_dict(softmax.state_dict(), strict=False).missing_keys
    assert {k.split(".")[0] for k in missing} == {"feature_q", "feature_k", "window_factor"}
    x, pos = torch.randn(2, 32, 32, dtype=torch.float64), torch.arange(32)
    torch.testing.assert_close(linear(x, pos), softmax(x, pos), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [1, 37, 64])
@pytest.mark.parametrize("window", [0, 1, 5, 16, 40])
def test_parallel_form_equals_the_reference(T, window):
    q, k, v, fq, fk, gamma = qkv(T=T)
    want = la.hybrid_attention(q, k, v, fq, fk, window, gamma)
    torch.testing.assert_close(la.hedgehog_attend(q, k, v, fq, fk, window, gamma), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 64, 100])
def test_chunked_linear_attention_is_the_masked_product(chunk):
    _, _, v, fq, fk, _ = qkv(T=50)
    want = (fq @ fk.transpose(-2, -1)).tril() @ v  # Σ_{j<=i} φ(q_i)·φ(k_j) v_j, quadratic
    torch.testing.assert_close(la.chunked_linear(fq, fk, v, chunk), want, rtol=1e-12, atol=1e-12)


def test_linear_attention_by_the_kernel_trick_is_a_recurrence():
    """window 0: y_i = φ(q_i) S_i / φ(q_i)·z_i with S, z summed token by token (Katharopoulos et al.)."""
    q, k, v, fq, fk, _ = qkv(T=20)
    S, z, ys = 0, 0, []
    for t in range(20):
        S = S + fk[:, :, t, :, None] * v[:, :, t, None, :]  # (B, nh, F, hs)
        z = z + fk[:, :, t]  # (B, nh, F)
        ys.append((fq[:, :, t, None, :] @ S)[:, :, 0] / (fq[:, :, t] * z).sum(-1, keepdim=True))
    torch.testing.assert_close(la.hedgehog_attend(q, k, v, fq, fk, 0), torch.stack(ys, 2), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# The layer: recurrent = parallel, causality

@pytest.mark.parametrize("window", [0, 1, 4, 40])
@pytest.mark.parametrize("kw", [{}, {"pos": "rope", "n_kv_head": 2}])
def test_recurrent_form_equals_the_parallel_form(window, kw):
    """Token by token against the cache, a prefill then steps, and uneven pieces: the same outputs."""
    layer = h_model("H", window, **kw).blocks[0].mixer
    x, T = torch.randn(2, 30, 32, dtype=torch.float64), 30
    want = layer(x, torch.arange(T))
    for pieces in ([1] * T, [7] + [1] * 23, [5, 3, 9, 1, 12]):
        cache = layer.new_cache(2, 32, "cpu", torch.float64)
        outs, start = [], 0
        for n in pieces:
            outs.append(layer(x[:, start:start + n], torch.arange(start, start + n), cache))
            start += n
        torch.testing.assert_close(torch.cat(outs, 1), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("window", [0, 6])
def test_causal(window):
    layer = h_model("H", window).blocks[0].mixer
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    y = layer(x, torch.arange(30))
    x2 = x.clone()
    x2[:, 17:] = torch.randn(1, 13, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x2, torch.arange(30))[:, :17], y[:, :17], rtol=0, atol=0)


@pytest.mark.parametrize("layers,window", [("H", 4), ("H", 0), ("GH", 5), ("LH", 3)])
def test_gpt_decoding_equals_the_full_forward(layers, window):
    model = h_model(layers, window, window=6)
    idx = torch.randint(0, 64, (2, 10))
    out = generate(model, idx, 20, temperature=0, use_cache=True)
    assert torch.equal(out, generate(model, idx, 20, temperature=0, use_cache=False))
    with torch.no_grad():  # and the logits themselves, step by step
        cache = model.new_cache(2, 32)
        logits = [model(out[:, :10], cache=cache)[0]] + [model(out[:, t:t + 1], cache=cache)[0]
                                                         for t in range(10, 29)]
        full, _ = model(out[:, :29], targets=out[:, 1:30])
    torch.testing.assert_close(torch.cat(logits, 1), full[:, 9:29], rtol=1e-10, atol=1e-10)


def test_decode_memory_is_flat_in_the_context():
    cfg = dict(vocab_size=64, n_layer=2, n_head=4, n_embd=32, layers="H", linear_window=8)
    model = GPT(GPTConfig(block_size=4096, **cfg)).eval()
    sizes = {n: model.new_cache(1, n).nbytes() for n in (64, 512, 4096)}
    assert len(set(sizes.values())) == 1, sizes
    per_layer = 4 * 4 * (16 * 8 + 16) + 2 * 4 * 8 * 8 * 4 + 8 * 8  # S, z (fp32); ring k, v (4 x 8 x 8), positions
    assert sizes[64] == 2 * per_layer
    cache = model.new_cache(1, 4096)
    with torch.no_grad():
        model(torch.randint(0, 64, (1, 100)), cache=cache)
        for _ in range(50):
            model(torch.randint(0, 64, (1, 1)), cache=cache)
    assert cache.nbytes() == sizes[64]  # after 150 tokens: nothing grew
    softmax = GPT(GPTConfig(block_size=4096, **{**cfg, "layers": "G"}))
    assert softmax.new_cache(1, 4096).nbytes() == 64 * softmax.new_cache(1, 64).nbytes()


def test_flops_per_token_counts_the_feature_maps_and_the_state():
    layer = la.LinearAttention(tiny_config(layers="H", linear_window=4))
    n, hs, c = 16, 8, 32  # 2f features, head width, chunk (the sequence: 32 < LINEAR_CHUNK)
    weights = 32 * 96 + 32 * 32 + 2 * 4 * 8 * 8
    assert layer.flops_per_token(32) == 6 * weights + 4 * (12 * 4 * hs + 6 * c * (n + hs) + 12 * n * hs)


def test_config_letter_and_fields():
    assert GPTConfig(layers="MH", linear_window=0).layer_kinds() == "MH" * 6
    with pytest.raises(ValueError, match="linear_window"):
        GPTConfig(layers="H", linear_window=-1)
    cfg = la.linearized_config(GPTConfig(layers="LLG", n_layer=3), window=16)
    assert (cfg.layers, cfg.linear_window) == ("HHH", 16)
    with pytest.raises(ValueError, match="plain multi-head attention"):
        la.linearized_config(GPTConfig(attn="mla"))
    with pytest.raises(ValueError, match="no attention layer"):
        la.linearized_config(cfg)  # already linear


# ------------------------------------------------------------------------------------------------
# LoRA

def test_lora_starts_as_the_model_trains_only_adapters_and_merges_exactly():
    model = h_model("H", 4)
    idx = torch.randint(0, 64, (2, 16))
    before = model(idx, targets=idx)[0]
    params = lora.apply(model, rank=2, alpha=4)
    assert sum(isinstance(m, lora.LoRALinear) for m in model.modules()) == 4  # c_attn, c_proj x 2 layers
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in params}
    torch.testing.assert_close(model(idx, targets=idx)[0], before, rtol=0, atol=0)  # B = 0
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(3):
        model(idx, targets=idx)[1].backward()
        opt.step()
        opt.zero_grad()
    adapted = model(idx, targets=idx)[0]
    assert not torch.allclose(adapted, before)
    lora.merge(model)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    assert not any("lora" in k for k in model.state_dict())
    torch.testing.assert_close(model(idx, targets=idx)[0], adapted, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="nothing to adapt"):
        lora.apply(nn.Sequential(nn.Linear(2, 2)), targets=("mixer.c_attn",))


# ------------------------------------------------------------------------------------------------
# Linearizing a checkpoint of train.py

@pytest.fixture(scope="module")
def teacher_run(one_thread, data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    train.main(["--preset", "cpu-tiny", "--data_dir", data_root, "--dataset", "tiny_char", "--out_dir", str(out),
                "--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--batch_size", "8",
                "--max_iters", "300", "--warmup_iters", "10", "--eval_interval", "300", "--eval_iters", "2",
                "--pos", "learned", "--activation", "gelu", "--device", "cpu"])  # a plain GPT teacher
    return str(out)


def load_teacher(run):
    ckpt = checkpoint.load(os.path.join(run, "ckpt.pt"))
    teacher = GPT(checkpoint.model_config(ckpt))
    teacher.load_state_dict(ckpt["model"])
    return teacher.eval().requires_grad_(False)


def test_linearized_model_starts_as_the_teacher_when_the_window_covers_the_context(teacher_run):
    teacher = load_teacher(teacher_run)
    student = la.linearized(teacher, window=32)
    idx = torch.randint(0, 30, (2, 32))
    torch.testing.assert_close(student(idx, targets=idx)[0], teacher(idx, targets=idx)[0], rtol=1e-5, atol=1e-5)


def test_attention_transfer_lowers_each_layers_mse_tenfold(teacher_run, data_root):
    teacher = load_teacher(teacher_run)
    student = la.linearized(teacher, window=0).eval().requires_grad_(False)  # Hedgehog: linear only
    params = la.transfer_parameters(student)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)  # LoLCATs' stage-1 learning rate
    data = os.path.join(data_root, "tiny_char")
    loader = Loader(open_split(data, "train"), 8, 32, seed=1)
    held_out = Loader(open_split(data, "val"), 16, 32, seed=0).get(0)[0]
    with torch.no_grad():
        before = la.transfer_loss(teacher, student, held_out)
    for _ in range(200):
        la.transfer_loss(teacher, student, loader.next()[0]).sum().backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = la.transfer_loss(teacher, student, held_out)
    assert before.shape == (2,) and (after * 10 <= before).all(), (before.tolist(), after.tolist())


def test_linearize_end_to_end_and_sampling_loads_the_result(teacher_run, tmp_path):
    out = str(tmp_path / "linear")
    summary = linearize.main(["--ckpt", teacher_run, "--out_dir", out, "--window", "8", "--transfer_iters", "20",
                              "--finetune_iters", "20", "--eval_interval", "10", "--eval_iters", "2",
                              "--device", "cpu"])
    ckpt = checkpoint.load(os.path.join(out, "ckpt.pt"))
    assert ckpt["model_config"]["layers"] == "H" and ckpt["model_config"]["linear_window"] == 8
    assert not any("lora" in k for k in ckpt["model"])
    assert summary["val_loss"] < summary["teacher_val_loss"] + 1.0  # a working model, not a broken one
    for name in ("transfer.png", "loss.png", "log.jsonl", "config.json"):
        assert os.path.exists(os.path.join(out, name)), name
    with open(os.path.join(out, "log.jsonl")) as f:
        kinds = {json.loads(line)["kind"] for line in f}
    assert kinds == {"eval", "transfer", "train", "summary"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "sampling.py"), "--out_dir", out,
                           "--prompt", "ROMEO:", "--num-samples", "1", "--max-new-tokens", "40"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("---\n", 1)[1].startswith("ROMEO:") and len(proc.stdout.split("---\n", 1)[1]) > 40


# ------------------------------------------------------------------------------------------------
# GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_compiled_model_matches_the_eager_fp32_reference(full_fp32, fresh_compile):
    """A GPT of H layers (window 64 of 512: both parts) on the GPU: the compiled training forward and
    backward against eager fp32 (fp32: 1e-4; bf16 autocast: the loss to 1e-2), and the cached decode
    against the full forward. (Window 0 is the same code without the window part.)"""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, block_size=512, n_layer=2, n_head=4, n_embd=256, layers="H",
                    linear_window=64)
    model = GPT(cfg).cuda()
    idx = torch.randint(0, 512, (4, 512), device="cuda")
    feature_grad = lambda: model.blocks[0].mixer.feature_q.weight.grad  # noqa: E731

    def loss_and_grad(run, autocast=False):
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            _, loss = run(idx, targets=idx)
        loss.backward()
        return loss.item(), feature_grad().clone()

    want, grad_want = loss_and_grad(model)
    compiled = torch.compile(model)
    got, grad_got = loss_and_grad(compiled)
    assert abs(got - want) / want < 1e-4
    assert ((grad_got - grad_want).norm() / grad_want.norm()).item() < 1e-4
    got_bf16, _ = loss_and_grad(compiled, autocast=True)
    assert abs(got_bf16 - want) / want < 1e-2
    model.eval()
    with torch.no_grad():
        cache = model.new_cache(2, 512)
        steps = [model(idx[:2, :100], cache=cache)[0]]
        steps += [model(idx[:2, t:t + 1], cache=cache)[0] for t in range(100, 140)]
        full, _ = model(idx[:2, :140], targets=idx[:2, :140])
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 99:140], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(la.chunk_linear_attn is None, reason="fla-core is not installed")
def test_gpu_fla_kernel_matches_the_pytorch_chunks():
    g = torch.Generator().manual_seed(0)
    fq, fk = (torch.rand(2, 4, 1000, 64, generator=g).softmax(-1).cuda() for _ in range(2))
    v = torch.randn(2, 4, 1000, 64, generator=g).cuda()
    assert la._fla_works(fq.device), "fla-core's kernel was refused or disagreed (see the warning)"
    want = la.chunked_linear(fq.double(), fk.double(), v.double()).float()
    got = la._fla_linear(fq, fk, v)
    assert ((got - want).norm() / want.norm()).item() < 5e-3  # fla's fp32 dots may round to TF32
