"""Optimizers and schedules (gpt/optim.py): Muon + AdamW parameter split, Muon's batched step
against torch.optim.Muon, learning on a tiny model, and the learning-rate curves."""

import math

import pytest
import torch

from conftest import tiny_config
from gpt.config import TrainConfig
from gpt.model import GPT
from gpt.optim import (Muon, lr_at, make_optimizer, muon_params, set_lr,
                       zeropower_via_newtonschulz)


@pytest.mark.parametrize("tie", [True, False])
def test_muon_and_adamw_partition_the_parameters(tie):
    model = GPT(tiny_config(tie_weights=tie, pos="rope", qk_norm=True, bias=True))
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), "cpu")
    muon, adamw = opt.optimizers
    muon_ids = [id(p) for g in muon.param_groups for p in g["params"]]
    adamw_ids = [id(p) for g in adamw.param_groups for p in g["params"]]
    everything = [id(p) for p in model.parameters()]
    assert sorted(muon_ids + adamw_ids) == sorted(everything)  # each parameter exactly once
    names = {id(p): n for n, p in model.named_parameters()}
    on_muon = {names[i] for i in muon_ids}
    assert on_muon == {n for n, p in model.named_parameters()
                       if n.startswith("blocks.") and n.endswith("weight") and p.dim() == 2}
    on_adamw = {names[i] for i in adamw_ids}
    assert {"wte.weight", "ln_f.weight"} <= on_adamw
    assert tie or "lm_head.weight" in on_adamw
    assert all(p.dim() == 2 for g in muon.param_groups for p in g["params"])
    no_decay = adamw.param_groups[1]
    assert no_decay["weight_decay"] == 0 and all(p.dim() < 2 for p in no_decay["params"])


def test_a_matrix_can_opt_out_of_muon():
    model = GPT(tiny_config())
    model.blocks[0].ffn.c_fc.weight.muon = False
    assert all(p is not model.blocks[0].ffn.c_fc.weight for p in muon_params(model))


def test_newton_schulz_is_near_orthogonal():
    G = torch.randn(3, 48, 16)  # tall matrices, batched
    X = zeropower_via_newtonschulz(G).float()
    s = torch.linalg.svdvals(X)  # (3, 16)
    assert X.shape == G.shape and s.min() > 0.5 and s.max() < 1.5


GPU = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", GPU])
@pytest.mark.parametrize("nesterov,wd", [(True, 0.0), (False, 0.1)])
def test_batched_muon_equals_torch_muon(nesterov, wd, device):
    shapes = [(16, 32), (16, 32), (48, 16), (48, 16), (24, 24)]
    ref_params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    our_params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    ref = torch.optim.Muon(ref_params, lr=0.05, nesterov=nesterov, weight_decay=wd)
    ours = Muon(our_params, lr=0.05, nesterov=nesterov, weight_decay=wd)
    for _ in range(3):
        grads = [torch.randn(s, device=device) for s in shapes]
        for p, q, g in zip(ref_params, our_params, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    # on a GPU both iterate in bf16 (batched and one-by-one round alike); on a CPU ours runs in fp32,
    # torch's in bf16: 3 steps of lr 0.05 differ by bf16's rounding of the update (~1%)
    atol = 2e-3 if device == "cuda" else 5e-3
    for p, q in zip(ref_params, our_params):
        torch.testing.assert_close(q, p, rtol=0, atol=atol)
    ours_state = ours.state_dict()["state"]
    for i, p in enumerate(ref_params):
        torch.testing.assert_close(ours_state[i]["momentum_buffer"], ref.state[p]["momentum_buffer"])


def test_muon_skips_a_step_on_the_device():
    """found_inf = 1 (a non-finite gradient, read on the device): weights and momentum stay exactly
    as they were; found_inf = 0: the step of a Muon without it."""
    shapes = [(16, 32), (16, 32), (48, 16)]
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    plain, flagged = (Muon(ps, lr=0.05, weight_decay=0.1) for ps in (a, b))
    for _ in range(2):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        plain.step()
        flagged.found_inf = torch.tensor(0.0)
        flagged.step()
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p)
    weights = [q.detach().clone() for q in b]
    momenta = [flagged.state[q]["momentum_buffer"].clone() for q in b]
    for q in b:
        q.grad = torch.full_like(q, float("nan"))
    flagged.found_inf = torch.tensor(1.0)
    flagged.step()
    assert all(torch.equal(q, w) for q, w in zip(b, weights))
    assert all(torch.equal(flagged.state[q]["momentum_buffer"], m) for q, m in zip(b, momenta))


def test_muon_takes_a_tensor_learning_rate():
    """A captured CUDA graph (model.graph_step) hands Muon its lr as a 0-d tensor: the same step."""
    shapes = [(16, 32), (16, 32), (48, 16)]
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    start = [p.detach().clone() for p in a]
    plain, tensor_lr = Muon(a, lr=0.05, weight_decay=0.1), Muon(b, lr=0.05, weight_decay=0.1)
    tensor_lr.param_groups[0]["lr"] = torch.tensor(0.05)
    for found_inf in (None, torch.tensor(0.0)):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        plain.step()
        tensor_lr.found_inf = found_inf
        tensor_lr.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(q, p)
    assert not any(torch.allclose(p, p0) for p, p0 in zip(a, start))  # both steps moved the weights


def test_tiny_model_learns_with_muon():
    model = GPT(tiny_config())
    tc = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.03, warmup_iters=0, max_iters=40)
    opt = make_optimizer(model, tc, "cpu")
    idx = torch.randint(0, 64, (8, 32))
    losses = []
    for step in range(40):
        set_lr(opt, lr_at(step, tc))
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses  # random tokens, memorised: 4.2 -> about 2.5


def test_muon_lr_follows_the_schedule_scaled():
    model = GPT(tiny_config())
    tc = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02)
    opt = make_optimizer(model, tc, "cpu")
    set_lr(opt, 5e-4)  # half the peak
    muon, adamw = opt.optimizers
    assert math.isclose(muon.param_groups[0]["lr"], 0.01)
    assert all(math.isclose(g["lr"], 5e-4) for g in adamw.param_groups)


def test_optimizers_state_dict_round_trip():
    model = GPT(tiny_config())
    tc = TrainConfig(optimizer="muon")
    opt = make_optimizer(model, tc, "cpu")
    _, loss = model(torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    loss.backward()
    opt.step()
    fresh = make_optimizer(model, tc, "cpu")
    fresh.load_state_dict(opt.state_dict())
    assert len(fresh.optimizers[0].state) == len(muon_params(model))
    with pytest.raises(ValueError, match="another optimizer"):
        fresh.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="sgd")


# ------------------------------------------------------------------------------------------------
# schedules

def test_cosine_endpoints():
    tc = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110, schedule="cosine")
    assert math.isclose(lr_at(0, tc), 1e-4)  # (0 + 1) / 10 of the peak
    assert math.isclose(lr_at(9, tc), 1e-3)  # end of warmup: the peak
    assert math.isclose(lr_at(10, tc), 1e-3)
    assert math.isclose(lr_at(60, tc), (1e-3 + 1e-4) / 2)  # halfway: the mean
    assert math.isclose(lr_at(110, tc), 1e-4) and math.isclose(lr_at(500, tc), 1e-4)
    after = [lr_at(s, tc) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_wsd_endpoints():
    tc = TrainConfig(lr=1e-3, min_lr=0.0, warmup_iters=10, max_iters=100, schedule="wsd", decay_frac=0.2)
    assert math.isclose(lr_at(9, tc), 1e-3)
    assert all(lr_at(s, tc) == 1e-3 for s in range(10, 81))  # stable until the last 20%
    assert math.isclose(lr_at(90, tc), 5e-4)  # linear decay
    assert lr_at(100, tc) == 0.0
