"""The config (issue 2): the --key value parser type-checks values and names close matches for
unknown keys; presets build; out-of-range values fail when the config is built; lr_decay_iters
pins the learning-rate schedule so that a run can stop early and resume on it."""

import re

import pytest

from gpt import config as cfg
from gpt.optim import lr_at


def test_overrides_take_the_fields_types():
    o = cfg.parse_overrides(["--n_layer", "4", "--lr=1e-3", "--compile", "false", "--bias", "yes",
                             "--dataset", "tiny", "--block-size", "64", "--max_iters", "2_000"])
    assert o == {"n_layer": 4, "lr": 1e-3, "compile": False, "bias": True, "dataset": "tiny",
                 "block_size": 64, "max_iters": 2000}
    assert type(o["n_layer"]) is int and type(o["lr"]) is float


@pytest.mark.parametrize("argv, message", [
    (["--n_layer", "four"], "--n_layer expects an int, got 'four'"),
    (["--n_layer", "2.5"], "--n_layer expects an int, got '2.5'"),
    (["--lr", "fast"], "--lr expects a float, got 'fast'"),
    (["--compile", "maybe"], "--compile expects true or false, got 'maybe'"),
    (["--n_layers", "4"], "unknown config key 'n_layers'. Did you mean n_layer"),
    (["--learning_rate", "1e-3"], "unknown config key 'learning_rate'."),
    (["--lr"], "--lr needs a value"),
    (["n_layer", "4"], "expected --key value, got 'n_layer'"),
])
def test_bad_overrides_fail_with_a_clear_message(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.parse_overrides(argv)


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Valid keys: .*max_bad_steps.*n_layer"):
        cfg.parse_overrides(["--nonsense", "1"])


@pytest.mark.parametrize("name", sorted(cfg.PRESETS))
def test_presets_build(name):
    model, run = cfg.build(name)
    assert model.n_embd % model.n_head == 0 and run.out_dir.startswith("out/")


@pytest.mark.parametrize("overrides, message", [
    (dict(lr=-1.0), "lr > 0"),
    (dict(lr=1e-3, min_lr=1e-2), "min_lr <= lr"),
    (dict(n_embd=30, n_head=4), "n_embd (30) must be divisible by n_head (4); try n_embd=32"),
    (dict(batch_size=0), "batch_size must be positive"),
    (dict(keep_checkpoints=0), "keep_checkpoints must be positive"),
    (dict(max_bad_steps=0), "max_bad_steps must be positive"),
    (dict(lr_decay_iters=-1), "lr_decay_iters"),
    (dict(schedule="linear"), "schedule='linear' is not one of"),
    (dict(dropout=1.5), "dropout must be in [0, 1)"),
])
def test_out_of_range_values_fail_when_built(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cfg.build("cpu-tiny", overrides)


def test_unknown_key_in_build_fails():
    with pytest.raises(ValueError, match="Did you mean max_iters"):
        cfg.build(None, {"max_iter": 10})


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_lr_decay_iters_pins_the_schedule(schedule):
    """A run stopped early at max_iters=300 follows the 1000-step schedule when lr_decay_iters=1000."""
    planned = cfg.TrainConfig(max_iters=1000, schedule=schedule)
    early = cfg.TrainConfig(max_iters=300, lr_decay_iters=1000, schedule=schedule)
    stretched = cfg.TrainConfig(max_iters=300, schedule=schedule)
    assert [lr_at(s, early) for s in range(300)] == [lr_at(s, planned) for s in range(300)]
    assert lr_at(299, stretched) < lr_at(299, planned)  # without it the 300 steps decay fully
