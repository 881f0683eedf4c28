"""BitNet b1.58 (gpt/bitnet.py): the quantisers' grids, the straight-through gradient, which layers
become ternary, packing, the integer path, the packed checkpoint (size, safe load, sampling.py), and
on a GPU torch._int_mm against the CPU reference."""

import copy
import io
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sampling
import train
from conftest import tiny_config
from gpt import bitnet, checkpoint
from gpt.config import GPTConfig
from gpt.model import GPT

pytestmark = pytest.mark.usefixtures("one_thread")


def layer(K=40, N=24, bias=True):
    """A BitLinear with a non-trivial norm gain and bias, its weight like a trained one's."""
    m = bitnet.BitLinear(K, N, bias=bias)
    with torch.no_grad():
        m.weight.normal_(0, 0.02)
        m.norm.weight.uniform_(0.5, 1.5)
        if bias:
            m.bias.normal_(0, 0.1)
    return m


def tokens(B=3, T=5, K=40):
    x = torch.randn(B, T, K)
    x[0, 0, 3] = 25.0  # an outlier channel: its token's scale is set by it
    return x


# ------------------------------------------------------------------------------------------------
# The quantisers

def by_hand(m, x):
    """The quantised point, computed here from the definitions: v = x_q / s (B, T, K) and V = β W_q
    (N, K), with x_q, s, W_q, β; u = RMSNorm(x)."""
    u = F.rms_norm(x, (x.shape[-1],), m.norm.weight.detach(), 1e-6)
    s = 127 / u.abs().amax(-1, keepdim=True)  # (B, T, 1): one scale per token
    x_q = (u * s).round().clamp(-128, 127)
    w = m.weight.detach()
    beta = w.abs().mean()
    w_q = torch.where(w.abs() < beta / 2, 0.0, w.sign())  # absmean rounding: |w| < β/2 -> 0, else ±1
    return x_q, s, w_q, beta


def spy_on_linear(monkeypatch):
    """Record the operands of every F.linear call (BitLinear's one matmul)."""
    calls, linear = [], F.linear

    def spy(a, b, bias=None):
        calls.append((a.detach(), b.detach()))
        return linear(a, b, bias)
    monkeypatch.setattr(F, "linear", spy)
    return calls


def test_matmul_sees_ternary_weights_and_int8_activations(monkeypatch):
    m, x = layer(), tokens()
    calls = spy_on_linear(monkeypatch)
    m(x)
    (a, b), = calls
    x_q, s, w_q, beta = by_hand(m, x.detach())
    # weights: at most 3 distinct values, {-1, 0, 1}, the absmean rounding of W (times β after)
    assert len(b.unique()) <= 3 and set(b.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(b, w_q)
    # activations: integers in [-128, 127], each token's own scale (its largest hits 127)
    assert torch.equal(a, a.round()) and a.min() >= -128 and a.max() <= 127
    assert torch.equal(a.abs().amax(-1), torch.full(a.shape[:-1], 127.0))
    assert torch.equal(a, x_q)
    assert len(a[0, 0].unique()) > 3  # 8 bits, not ternary


def test_forward_is_the_linear_at_the_quantised_point():
    """BitLinear(x) = (x_q / s)(β W_q)^T + b."""
    m, x = layer(), tokens()
    x_q, s, w_q, beta = by_hand(m, x)
    expected = F.linear(x_q / s, w_q * beta, m.bias)
    assert torch.allclose(m(x), expected, rtol=1e-5, atol=1e-6)


def close(a, b):
    """Equal up to float rounding (sums taken in another order), relative to b's scale."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_ste_gradient_is_the_linear_gradient_at_the_quantised_point():
    """The same point: the plain linear y = F.linear(v, V, b) at v = x_q / s (the quantised input)
    and V = β W_q (the quantised weight), with the same upstream gradient g. Straight-through means:
    the latent W gets dL/dV, the bias dL/db, and the input x the norm's backward applied to dL/dv."""
    m, x = layer(), tokens().requires_grad_()
    g = torch.randn(3, 5, 24)
    m(x).backward(g)

    x_q, s, w_q, beta = by_hand(m, x.detach())
    v = (x_q / s).requires_grad_()  # (B, T, K): the quantised point
    V = (w_q * beta).requires_grad_()  # (N, K)
    b = m.bias.detach().clone().requires_grad_()
    F.linear(v, V, b).backward(g)
    assert close(m.weight.grad, V.grad)
    assert torch.allclose(m.bias.grad, b.grad)
    x2 = x.detach().requires_grad_()
    F.rms_norm(x2, (40,), m.norm.weight.detach(), 1e-6).backward(v.grad)  # chain through the norm
    assert close(x.grad, x2.grad)
    assert m.weight.grad.abs().sum() > 0  # not the zero gradient of round()


def test_bitlinear_is_one_graph_for_torch_compile():
    """fullgraph=True fails on any graph break (a Python branch on data, a .item()); aot_eager traces
    forward and backward without generating code, so this runs in seconds on a CPU."""
    m, x = layer(), tokens().requires_grad_()
    y = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    y.square().sum().backward()
    grad = m.weight.grad.clone()
    m.weight.grad = None
    m(x).square().sum().backward()
    assert torch.equal(y, m(x)) and torch.allclose(grad, m.weight.grad)


# ------------------------------------------------------------------------------------------------
# Which layers

def bit_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, bitnet.BitLinear)}


def test_which_layers_per_mode_and_mixer():
    hybrid = dict(layers="MG", mamba_head_dim=16, mamba_d_state=8, mamba_chunk_size=8)
    ffn = {f"blocks.{i}.ffn.{n}" for i in (0, 1) for n in ("c_fc", "c_proj")}
    mamba = {"blocks.0.mixer.in_proj", "blocks.0.mixer.out_proj"}
    attn = {"blocks.1.mixer.c_attn", "blocks.1.mixer.c_proj"}
    assert bit_names(GPT(tiny_config(bitnet="ffn", **hybrid))) == ffn
    assert bit_names(GPT(tiny_config(bitnet="all_but_attention", **hybrid))) == ffn | mamba
    assert bit_names(GPT(tiny_config(bitnet="all", **hybrid))) == ffn | mamba | attn
    assert bit_names(GPT(tiny_config(**hybrid))) == set()
    linear = GPT(tiny_config(bitnet="all_but_attention", layers="HG"))  # linear attention is attention
    assert bit_names(linear) == ffn
    # MLA: everything but wkv_b (absorbed into the query at decoding)
    mla = GPT(tiny_config(bitnet="all", attn="mla", pos="rope", q_lora_rank=16))
    assert {n for n in bit_names(mla) if "mixer" in n} == {
        f"blocks.{i}.mixer.{n}" for i in (0, 1) for n in ("wq_a", "wq_b", "wkv_a", "c_proj")}
    # MoE: shared experts ternary; router and the 3-D routed experts full precision
    moe = GPT(tiny_config(bitnet="ffn", ffn="moe", n_expert=4, n_expert_active=2, n_shared_expert=1))
    assert bit_names(moe) == {f"blocks.{i}.ffn.shared.{j}" for i in (0, 1) for j in (0, 1)}
    assert type(moe.blocks[0].ffn.router.gate) is nn.Linear and moe.blocks[0].ffn.w1.dim() == 3
    # MoA and PEER: their routers (and PEER's query) stay; MoA's shared c_kv swaps
    mix = GPT(tiny_config(bitnet="all", attn_experts=2, attn_experts_active=2, ffn="peer", moe_every=2,
                          peer_keys=4, peer_heads=2, peer_topk=2, peer_key_dim=8))
    assert bit_names(mix) == {"blocks.0.mixer.c_kv", "blocks.1.mixer.c_kv", "blocks.0.ffn.c_fc",
                              "blocks.0.ffn.c_proj"}
    # MoD: the router and predictor stay; the routed block's layers swap
    mod = GPT(tiny_config(bitnet="all", mod_every=2))
    assert bit_names(mod) == {f"blocks.{i}.{n}" for i, n in ((0, "mixer.c_attn"), (0, "mixer.c_proj"),
                              (0, "ffn.c_fc"), (0, "ffn.c_proj"), (1, "block.mixer.c_attn"),
                              (1, "block.mixer.c_proj"), (1, "block.ffn.c_fc"), (1, "block.ffn.c_proj"))}
    for model in (mla, moe, mix, mod):  # embeddings and head always full precision
        assert type(model.lm_head) is nn.Linear and type(model.wte) is nn.Embedding


def test_config_rejects_unknown_mode():
    with pytest.raises(ValueError, match="bitnet='half' is not one of 'none', 'ffn'"):
        GPTConfig(bitnet="half")


def test_surgery_keeps_the_init_and_the_optimizer_sees_latent_weights():
    torch.manual_seed(0)
    plain = GPT(tiny_config())
    torch.manual_seed(0)
    bit = GPT(tiny_config(bitnet="all"))
    assert torch.equal(plain.blocks[1].mixer.c_proj.weight, bit.blocks[1].mixer.c_proj.weight)  # scaled init
    assert bit.blocks[1].mixer.c_proj.weight.dtype == torch.float32  # latent, full precision
    from gpt.optim import muon_params
    assert any(p is bit.blocks[0].ffn.c_fc.weight for p in muon_params(bit))  # still an nn.Linear


def test_bitnet_all_but_attention_trains_on_cpu():
    torch.manual_seed(0)
    config = tiny_config(bitnet="all_but_attention", vocab_size=16, block_size=16)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 12, (16, 1), generator=g)
    seq = (start + torch.arange(17)) % 12  # (16, 17): count up mod 12, learnable from context
    x, y = seq[:, :-1], seq[:, 1:]
    losses = []
    for _ in range(60):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert len(bitnet.ternary(model.blocks[0].ffn.c_fc.weight)[0].unique()) <= 3


# ------------------------------------------------------------------------------------------------
# Packing and the integer path

def test_pack_save_load_unpack_is_bit_exact(tmp_path):
    w_q = torch.randint(-1, 2, (7, 13)).float()  # K = 13: not a multiple of 4
    packed = bitnet.pack_ternary(w_q)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 4)  # ceil(13 / 4) bytes per row
    assert torch.equal(bitnet.unpack_ternary(packed, 13), w_q.to(torch.int8))
    assert bitnet.pack_ternary(torch.tensor([[-1.0, 0.0, 1.0, 1.0]])).item() == 0 | 1 << 2 | 2 << 4 | 2 << 6
    path = str(tmp_path / "p.pt")
    checkpoint.save(path, {"packed": packed})
    loaded = checkpoint.load(path)["packed"]  # weights_only
    assert torch.equal(loaded, packed) and torch.equal(bitnet.unpack_ternary(loaded, 13), w_q.to(torch.int8))


def test_integer_path_equals_fake_quantised_forward():
    m, x = layer(K=36, N=20), tokens(K=36)
    x_q, s = bitnet.absmax_int8(m.norm(x).detach().reshape(-1, 36))  # (M, K), (M, 1)
    w_q, beta = bitnet.ternary(m.weight.detach())
    acc = bitnet.int_matmul(x_q.to(torch.int8), w_q.to(torch.int8))  # (M, N) int32 (CPU reference)
    assert acc.dtype == torch.int32
    assert torch.equal(acc.double(), F.linear(x_q.double(), w_q.double()))  # exact integer product
    packed = bitnet.PackedBitLinear.from_bitlinear(m)
    with torch.no_grad():
        y_fake, y_int = m(x), packed(x)
    assert y_int.shape == y_fake.shape == (3, 5, 20)
    x_q, s, w_q, beta = by_hand(m, x)
    assert torch.allclose(y_int, F.linear(x_q / s, w_q * beta, m.bias), rtol=1e-5, atol=1e-6)  # after scaling
    assert torch.equal(y_int, y_fake)  # and in fp32 BitLinear's own forward is the integer path, bit for bit


@pytest.mark.parametrize("kw", [
    dict(bitnet="all", attn="mla", pos="rope"),
    dict(bitnet="all_but_attention", layers="MG", mamba_head_dim=16, mamba_d_state=8, mamba_chunk_size=8),
    dict(bitnet="ffn", ffn="moe", n_expert=4, n_expert_active=2, n_shared_expert=1),
], ids=["mla-all", "mamba-hybrid", "moe-ffn"])
def test_packed_model_is_the_trained_model_for_every_mixer(kw):
    """fp32: logits bit for bit, and cached decoding (MLA's absorbed path, Mamba's recurrence) runs."""
    from gpt.generate import generate
    model = GPT(tiny_config(**kw)).eval()
    packed = bitnet.pack(GPT(tiny_config(**kw)))
    packed.load_state_dict(bitnet.pack(copy.deepcopy(model)).state_dict())
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(idx, idx)[0], packed.eval()(idx, idx)[0])
    a = generate(model, idx[:, :4], 6, temperature=0)
    assert torch.equal(a, generate(packed, idx[:, :4], 6, temperature=0))


def train_run(data_root, out, bitnet_mode="all_but_attention"):
    """A 20-step train.py run of a tiny model into out; returns the run folder."""
    train.main(["--preset", "cpu-tiny", "--data_dir", data_root, "--dataset", "tiny_char",
                "--out_dir", str(out), "--n_layer", "2", "--n_head", "2", "--n_embd", "32",
                "--block_size", "16", "--batch_size", "8", "--max_iters", "20", "--eval_interval", "20",
                "--eval_iters", "2", "--device", "cpu", "--bitnet", bitnet_mode])
    return str(out)


def test_export_then_sample_the_packed_model(data_root, tmp_path, capsys):
    run = train_run(data_root, tmp_path / "run")
    bitnet.main([run])
    dst = os.path.join(run, "packed.pt")
    assert "smaller" in capsys.readouterr().out
    ckpt = checkpoint.load(dst)  # weights_only: safe
    assert ckpt["bitnet_packed"] and ckpt["model"]["blocks.0.ffn.c_fc.packed"].dtype == torch.uint8
    assert not any(k.endswith("c_fc.weight") for k in ckpt["model"])  # no latent weights shipped
    packed_model, _ = sampling.load_model(dst)
    latent_model, _ = sampling.load_model(run)
    idx = torch.randint(0, 20, (2, 16))
    with torch.no_grad():
        a, _ = latent_model(idx, idx)
        b, _ = packed_model(idx, idx)
    assert isinstance(packed_model.blocks[0].ffn.c_fc, bitnet.PackedBitLinear)
    assert torch.equal(a, b)  # fp32: the packed model is the trained one, bit for bit
    assert sampling.main(["--out_dir", dst, "--prompt", "ROMEO:", "--num-samples", "1",
                          "--max-new-tokens", "8", "--device", "cpu"]) is None
    out = capsys.readouterr().out
    assert "ROMEO:" in out and len(out.split("---\n", 1)[1]) >= len("ROMEO:") + 8
    with pytest.raises(ValueError, match="already packed"):
        bitnet.export(dst)


def test_export_refuses_a_full_precision_run(data_root, tmp_path):
    run = train_run(data_root, tmp_path / "plain", bitnet_mode="none")
    with pytest.raises(ValueError, match="bitnet='none'"):
        bitnet.export(run)


def saved_bytes(tensors):
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.tell()


def test_packed_ternary_layers_are_at_least_7x_smaller_than_bf16():
    model = GPT(tiny_config(n_embd=256, n_head=4, bitnet="all_but_attention"))
    bf16 = {}
    for name, m in model.named_modules():
        if isinstance(m, bitnet.BitLinear):
            bf16.update({f"{name}.{k}": v.to(torch.bfloat16) for k, v in m.state_dict().items()})
    bitnet.pack(model)
    packed = {}
    for name, m in model.named_modules():
        if isinstance(m, bitnet.PackedBitLinear):
            packed.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
    ratio = saved_bytes(bf16) / saved_bytes(packed)  # bytes on disk, zip headers included
    packed_b, bf16_b = bitnet.bitlinear_bytes(model)
    assert ratio >= 7 and bf16_b / packed_b >= 7, (ratio, bf16_b / packed_b)
    assert abs(packed_b - sum(v.numel() * v.element_size() for v in packed.values())) == 0
    assert packed_b < 2.3 / 8 * sum(m.in_features * m.out_features for m in model.modules()
                                    if isinstance(m, bitnet.PackedBitLinear))  # ~2 bits per weight


# ------------------------------------------------------------------------------------------------
# GPU: torch._int_mm against the CPU reference (the compiled training path: bench.py's gpt2-bitnet)

@pytest.mark.parametrize("M,K,N", [(1, 64, 64), (16, 768, 768), (17, 36, 13), (64, 768, 3072),
                                   (100, 768, 3072), (333, 3072, 768), (5, 20, 50)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int_mm_equals_cpu_reference_exactly(M, K, N):
    g = torch.Generator().manual_seed(M * K + N)
    a = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(-1, 2, (N, K), generator=g, dtype=torch.int8)
    got = bitnet.int_matmul(a.cuda(), w.cuda())
    assert got.dtype == torch.int32 and got.shape == (M, N)
    assert torch.equal(got.cpu(), bitnet.int_matmul_reference(a, w))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_layer_on_gpu_equals_cpu(monkeypatch):
    """Unpacking, _int_mm and the rescale on the GPU against the CPU, on the GPU's own int8
    activations (its RMSNorm may differ from the CPU's in the last bit and so move an activation
    across a rounding boundary: one int8 step changes its token's outputs by ~1e-3 of their scale)."""
    m = layer(K=768, N=3072)
    packed = bitnet.PackedBitLinear.from_bitlinear(m)
    x = torch.randn(2, 9, 768)
    with torch.no_grad():
        cpu = packed(x)
        calls, int_matmul = [], bitnet.int_matmul

        def spy(a, w):
            calls.append((a.cpu(), w.cpu()))
            return int_matmul(a, w)
        monkeypatch.setattr(bitnet, "int_matmul", spy)
        gpu = packed.cuda()(x.cuda())
        (a, w), = calls
        _, s = bitnet.absmax_int8(packed.norm(x.cuda()).reshape(-1, 768))  # (M, 1), the GPU's scales
    assert torch.equal(w, bitnet.unpack_ternary(packed.packed.cpu(), 768))  # unpacked on the GPU
    ref = bitnet.int_matmul_reference(a, w).float() * (packed.scale.cpu() / s.cpu()) + m.bias.detach()
    assert torch.allclose(gpu.cpu(), ref.view(2, 9, 3072), rtol=1e-5, atol=1e-6)
    assert torch.allclose(gpu.cpu(), cpu, rtol=0, atol=2e-3 * cpu.abs().max())
