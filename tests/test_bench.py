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
    assert {"gpu_decode", "paged_kernels"} <= set(cli.scripts())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a CPU-only machine gets")
def test_gpu_script_says_it_needs_a_gpu():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        cli.main(["gpu_decode"])


def test_layout_views_read_the_same_values():
    """decode_timeline --layouts: SDPA's own tensors seen as pages, and a head-outer pool, hold the same values.

    The paged reference reads them here; the benchmark runs the Triton kernel over them on the GPU (and asserts)."""
    from nexus_lessons.bench import decode_timeline as dt
    from nexus_lessons.kernels.reference import paged_decode_attention_ref

    g = torch.Generator().manual_seed(0)
    batch, context, hkv, dim = 2, 48, 8, 128  # the helpers assume the benchmark's Hkv and D
    k, v = (torch.randn(batch, hkv, context, dim, generator=g) for _ in range(2))
    q = torch.randn(batch, 4 * hkv, dim, generator=g)
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None].double(), k.double(), v.double(), enable_gqa=True
    )[:, :, 0]
    (k_pages, tables), (v_pages, _) = dt.sdpa_memory_as_pages(k, batch, context), dt.sdpa_memory_as_pages(v, batch, context)
    assert k_pages.data_ptr() == k.data_ptr()  # a view of SDPA's tensor, not a copy
    lens = torch.full((batch,), context, dtype=torch.int32)
    got = paged_decode_attention_ref(q, k_pages, v_pages, tables, lens)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)

    pool = k_pages[tables.flatten().long()].contiguous()  # the same values in a token-major pool
    outer = dt.head_outer_pool(pool)
    assert torch.equal(outer, pool) and outer.stride(2) == pool.shape[0] * pool.shape[1] * dim
