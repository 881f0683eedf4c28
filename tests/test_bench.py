"""bench.py: the CPU smoke run (--quick) the table depends on, every row's config, and on a GPU a
short real timing."""

import json

import pytest
import torch

import bench
from gpt import config as cfg


def test_quick_run_writes_the_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    results = bench.main(["--quick", "--rows", "gpt2,speedrun", "--json", str(path)])
    assert [r["row"] for r in results] == ["gpt2", "speedrun"]
    for r in results:
        assert "error" not in r, r
        assert r["ms_per_step"] > 0 and r["tok_per_s"] > 0 and r["first_step_s"] > 0
        assert r["tokens_per_step"] == 2 * 32  # QUICK's batch x context
    gpt2 = results[0]
    assert gpt2["decode_tok_s_cached"] > 0 and gpt2["decode_tok_s_uncached"] > 0
    # keys and values of 2 layers x 32 positions x 64 dims, fp32 on the CPU
    assert gpt2["cache_bytes_per_seq"] == 2 * 2 * 32 * 64 * 4
    saved = json.loads(path.read_text())
    assert saved["meta"]["torch"] == torch.__version__ and len(saved["rows"]) == 2
    out = capsys.readouterr().out
    assert "| row | ms/step | tok/s | MFU |" in out and "| gpt2 |" in out


@pytest.mark.parametrize("quick", [False, True])
def test_every_row_is_a_valid_config(quick):
    for name, row in bench.ROWS.items():
        overrides, knobs = bench.split_row(row, quick)
        cfg.build(None, overrides)  # raises on an unknown field or a bad value
        assert set(knobs) == set(bench.KNOBS), name
        assert knobs["sdpa"] in (None, *bench.SDPA_BACKENDS), name


def test_a_failing_row_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(bench.ROWS, "broken", {**bench.ROWS["gpt2"], "norm": "nope"})
    results = bench.main(["--quick", "--rows", "broken"])
    assert "norm" in results[0]["error"]
    assert "| broken | ValueError" in bench.table(results)


def test_profile_lists_the_step_s_operators(capsys):
    results = bench.main(["--quick", "--rows", "gpt2", "--profile", "1", "--no-decode"])
    table = results[0]["profile"]
    # the matrix products and the optimizer's step are among what a training step spends time in
    assert "aten::mm" in table and "Optimizer.step" in table
    assert table in capsys.readouterr().out


def test_decode_only_compiled_at_a_context(capsys):
    """--decode-only skips the training timing; --decode-compile decodes at the row's decode_at
    context (quick: 4 x the block, 2 sequences) through torch.compile."""
    results = bench.main(["--quick", "--rows", "gpt2-mla", "--decode-only", "--decode-compile",
                          "--decode-tokens", "4"])
    r = results[0]
    assert "error" not in r, r
    assert "ms_per_step" not in r and r["decode_compiled"] and r["decode_tok_s_cached"] > 0
    assert (r["decode_context"], r["decode_batch"]) == (4 * 32, 2)
    assert "| gpt2-mla |  |" in capsys.readouterr().out


def test_unknown_row_is_refused():
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--rows", "nope"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_timing_of_the_speedrun_model():
    results = bench.main(["--rows", "speedrun", "--steps", "5", "--warmup", "2", "--decode-tokens", "16"])
    r = results[0]
    assert "error" not in r, r
    assert 0 < r["mfu"] < 1 and r["peak_mem_GB"] > 0 and r["decode_tok_s_cached"] > 0
