"""RoPE: scores depend only on the position difference, the unrotated part of a partial rotation is
untouched, rotation preserves norms, tables stay fp32 and are built once."""

import torch

from conftest import tiny_config
from gpt.model import GPT
from gpt.rope import Rotary, apply_rotary


def scores(rot, q, k, q_pos, k_pos):
    return rot(q, q_pos) @ rot(k, k_pos).transpose(-2, -1)  # (B, nh, T, S)


def test_scores_depend_only_on_position_difference():
    rot = Rotary(16, max_len=4096)
    q, k = torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 16)
    pos = torch.arange(10)
    base = scores(rot, q, k, pos, pos)
    for shift in (1, 37, 1000, 4000):
        shifted = scores(rot, q, k, pos + shift, pos + shift)
        torch.testing.assert_close(shifted, base, atol=1e-5, rtol=1e-5)
    # and they do depend on the difference
    assert not torch.allclose(scores(rot, q, k, pos, pos + 3), base, atol=1e-3)


def test_rotation_matches_the_pairwise_formula():
    """(x1, x2) at position m -> (x1 cos mθ - x2 sin mθ, x1 sin mθ + x2 cos mθ), θ_i = base^(-2i/d),
    pairs (i, i + d/2)."""
    d, m = 8, 5
    x = torch.randn(1, 1, 1, d)
    y = Rotary(d, base=100.0, max_len=8)(x, torch.tensor([m]))
    for i in range(d // 2):
        theta = 100.0 ** (-2 * i / d)
        x1, x2 = x[..., i], x[..., i + d // 2]
        c, s = torch.cos(torch.tensor(m * theta)), torch.sin(torch.tensor(m * theta))
        torch.testing.assert_close(y[..., i], x1 * c - x2 * s)
        torch.testing.assert_close(y[..., i + d // 2], x1 * s + x2 * c)


def test_partial_rotation_leaves_the_rest_untouched():
    rot = Rotary(4, max_len=64)  # 4 of 16 dims turn
    x = torch.randn(2, 3, 20, 16)
    y = rot(x, torch.arange(20) + 7)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert not torch.allclose(y[..., :4], x[..., :4])
    # the config's rope_fraction picks the rotated dims: head_dim 8, fraction 0.5 -> 4 dims
    assert tiny_config(pos="rope", rope_fraction=0.5).rotary_dims == 4


def test_rotation_preserves_norm_and_position_zero_is_identity():
    rot = Rotary(16, max_len=128)
    x = torch.randn(2, 2, 50, 16)
    y = rot(x, torch.arange(50) + 60)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rot(x, torch.zeros(50, dtype=torch.long)), x)


def test_batched_positions():
    rot = Rotary(8, max_len=64)
    x = torch.randn(2, 3, 5, 8)
    pos = torch.tensor([[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]])
    y = rot(x, pos)
    torch.testing.assert_close(y[0], rot(x[:1], pos[0])[0])
    torch.testing.assert_close(y[1], rot(x[1:], pos[1])[0])


def test_tables_are_fp32_cached_and_survive_a_bf16_cast():
    model = GPT(tiny_config(pos="rope", block_size=2048))
    rot = model.blocks[0].mixer.rotary
    ptr = rot.cos.data_ptr()
    idx = torch.randint(0, 64, (1, 8))
    model(idx)
    assert rot.cos.data_ptr() == ptr  # built once, not per call
    exact = rot.cos.clone()
    model.to(torch.bfloat16)
    assert rot.cos.dtype == torch.float32 and torch.equal(rot.cos, exact)
    assert model.blocks[0].mixer.c_attn.weight.dtype == torch.bfloat16
    # bf16 inputs: computed in fp32, returned in bf16
    x = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    cos, sin = rot.cos[:4], rot.sin[:4]
    y = apply_rotary(x, cos, sin, 8)
    assert y.dtype == torch.bfloat16


def test_rope_model_has_no_position_table_and_is_causal():
    model = GPT(tiny_config(pos="rope")).eval()
    assert model.wpe is None
    idx = torch.randint(0, 64, (2, 20))
    a, _ = model(idx, idx)
    idx2 = idx.clone()
    idx2[:, 10:] = (idx2[:, 10:] + 1) % 64
    b, _ = model(idx2, idx2)
    torch.testing.assert_close(a[:, :10], b[:, :10])
