"""InferenceBenchmark and the CLI: they run, refuse a technique that changes the tokens, write JSON + PNG."""

from __future__ import annotations

import json

import pytest
import torch

import nexus_lessons as nl
from nexus_lessons.bench import __main__ as cli
from nexus_lessons.bench.suite import TECHNIQUES, InferenceBenchmark


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = nl.Transformer(nl.ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)).eval()
    return nl.save_pretrained(model, tmp_path_factory.mktemp("model"))


def test_benchmark_runs_every_technique_and_plots(model_dir, tmp_path):
    bench = InferenceBenchmark(str(model_dir), "all", [1, 2], [5, 9], prompt_len=7, repeats=1, progress=False)
    rows = bench.run()
    assert len(rows) == len(TECHNIQUES) * 2 * 2
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert all(r["speedup"] == 1.0 for r in rows if r["technique"] == "baseline")
    saved = json.loads(bench.save(tmp_path / "r.json").read_text())
    assert saved["model"] == str(model_dir) and len(saved["results"]) == len(rows) and "device" in saved
    bench.plot_comparison(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


def test_a_technique_that_changes_tokens_is_refused(model_dir, monkeypatch):
    def off_by_one(model, ids, n):
        out = nl.generate(model, ids, n, cache="static")
        out[:, -1] = (out[:, -1] + 1) % model.config.vocab_size
        return out

    monkeypatch.setitem(TECHNIQUES, "broken", off_by_one)
    bench = InferenceBenchmark(str(model_dir), ["baseline", "broken"], [1], [6], repeats=1, progress=False)
    with pytest.raises(AssertionError, match="broken changed the greedy tokens"):
        bench.run()


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown techniques"):
        InferenceBenchmark("nexus-tiny", ["warp_drive"])
    with pytest.raises(ValueError, match=">= 1"):
        InferenceBenchmark("nexus-tiny", ["baseline"], [0])


def test_cli_writes_json_and_png_and_lists_scripts(model_dir, tmp_path, capsys):
    cli.main(["--model", str(model_dir), "--techniques", "baseline", "kv_cache", "--sequence-lengths", "4",
              "--repeats", "1", "--output", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text())["results"][1]["technique"] == "kv_cache"
    assert (tmp_path / "out.png").exists()
    assert "kv_cache" in capsys.readouterr().out
    assert {"decode_sweep", "gpu_decode", "paged_kernels"} <= set(cli.scripts())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only machine gets")
def test_gpu_script_says_it_needs_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        cli.main(["gpu_decode"])


def test_gpu_decode_smoke_runs(tmp_path):
    """gpu_decode --smoke: a tiny Llama on the CPU; every decoder's float32 tokens equal transformers', and
    the eager pair is timed at one length (the GPU run adds the compiled pair)."""
    from nexus_lessons.bench import gpu_decode

    res = gpu_decode.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_decode.json").read_text())
    assert saved["smoke"] and all(saved["check_float32"].values()) and len(saved["check_float32"]) == 4
    eager = saved["headline"]["eager"]
    assert eager["speedup"] > 0 and {eager["baseline"], eager["ours"]} <= set(saved["rows"])
    assert {r["new_tokens"] for r in res["rows"].values()} == {saved["eager_new_tokens"]}


def test_decode_sweep_quick_runs_and_plots(tmp_path):
    """decode_sweep --quick: tiny shapes on the CPU (our kernel under the Triton interpreter, SDPA, Flex
    uncompiled), every shape asserted equal to SDPA before timing; the JSON has the schema the lesson
    reads, and the plot helper draws it. A fresh process: TRITON_INTERPRET must be set before triton loads."""
    import os
    import subprocess
    import sys

    import matplotlib

    matplotlib.use("Agg")
    from nexus_lessons.bench.decode_sweep import QUICK_BATCHES, QUICK_CONTEXTS, SIDES, plot_decode_sweep

    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "nexus_lessons.bench", "decode_sweep", "--quick", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "decode_sweep.json").read_text())
    assert data["benchmark"] == "decode_sweep" and data["quick"] and {"device", "torch", "date", "command"} <= set(data)
    assert "read_gbps" in data and "datasheet_gbps" in data and not data["errors"]
    assert [(r["batch"], r["context"]) for r in data["rows"]] == [(b, c) for b in QUICK_BATCHES for c in QUICK_CONTEXTS]
    for row in data["rows"]:
        assert row["bytes_read"] > 0 and row["max_abs_err_vs_sdpa"] < 3e-2 and row["max_abs_err_flex_vs_sdpa"] < 3e-2
        assert set(SIDES) <= set(row) and all({"ms", "pct_read"} <= set(row[s]) for s in SIDES)
        assert row["ours_eager"]["ms"] > 0 and row["sdpa_eager"]["ms"] > 0 and row["flex"]["ms"] > 0
    ax = plot_decode_sweep(tmp_path / "decode_sweep.json")
    assert len(ax.get_lines()) == 3  # ours, SDPA and Flex eager (no graphs on a CPU)
    # A GPU run's JSON draws % of the read bound, one series per side.
    for row in data["rows"]:
        for side in SIDES:
            row[side] = {"ms": 0.1, "pct_read": 90.0}
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps({**data, "read_gbps": 3000.0, "datasheet_gbps": 3350.0, "device": "NVIDIA H100"}))
    ax = plot_decode_sweep(gpu)
    assert len(ax.get_lines()) == len(SIDES) + 1 and ax.get_ylabel() == "% of read bandwidth"  # + the 100% line


def test_paged_kernels_smoke_runs(tmp_path):
    """paged_kernels --smoke: paging, waves and extend on tiny shapes on the CPU (the interpreter), every
    side checked before it is timed; the JSON has the sections the lesson reads."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "nexus_lessons.bench", "paged_kernels", "--smoke", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "paged_kernels.json").read_text())
    assert data["smoke"] and {"device", "torch", "date", "command", "read_gbps"} <= set(data)
    assert {"shuffled", "in_order", "sdpa"} <= set(data["paging"][0])
    assert [w["auto_schedule"] for w in data["waves"]] == ["split", "streamk"]  # spread lengths take stream-K
    assert all(w["programs_per_sm"] >= 1 for w in data["waves"])  # lesson 02 counts waves with it
    assert {"ours_graph", "ours_eager", "sdpa_graph", "sdpa_eager"} <= set(data["extend"][0])
