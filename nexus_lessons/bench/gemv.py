"""The batch-1 projections of a 1B Llama layer on a GPU: our GEMV kernel (every tile config) against
cuBLAS and torch.compile's own reduction, one shape at a time.

    python -m nexus_lessons.bench.gemv --out course/results/gemv_h200.json

Each side computes the same fused op (``kernels.gemv.fused_linear_ref``: [silu_and_mul] -> [rms_norm] ->
linear -> [+ residual]); "cuBLAS GEMV alone" is F.linear without its neighbours, a floor for the unfused
ops. Every call reads a different copy of the weights (copies rotate; together they exceed the L2), as
in a decode step, where a layer's weights are long evicted when they are read again. Times: median of
CUDA-graph replays of one call per copy, divided by the copies.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch._inductor.config

from .common import copy_bandwidth_gbs, environment, save_json

# (name, N, K, norm, silu_mul, residual) for hidden 2048, intermediate 8192, 32 + 8 + 8 heads of 64
SHAPES = [("qkv + rms_norm", 3072, 2048, True, False, False), ("o_proj + residual", 2048, 2048, False, False, True),
          ("gate_up + rms_norm", 16384, 2048, True, False, False),
          ("down + silu_and_mul + residual", 2048, 8192, False, True, True),
          ("lm_head + rms_norm", 32000, 2048, True, False, False)]  # fmt: skip
CONFIGS = [(1, 2048, 4, 1), (1, 1024, 4, 1), (2, 1024, 4, 1), (2, 2048, 4, 1), (2, 2048, 8, 1), (4, 512, 4, 1),
           (4, 1024, 4, 1), (4, 1024, 4, 2), (4, 2048, 4, 1), (4, 2048, 8, 1), (8, 512, 4, 1), (8, 1024, 4, 1),
           (8, 1024, 8, 1), (8, 2048, 8, 1), (16, 256, 4, 1), (16, 512, 4, 1), (16, 512, 8, 2), (16, 1024, 8, 1),
           (32, 256, 4, 1), (32, 512, 8, 1)]  # fmt: skip
L2_BYTES = 50 * 2**20


def _time(fn, reps: int = 50) -> float:
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=reps, return_mode="median"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="course/results/gemv_h200.json")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile's side (slow to build)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    from ..kernels import gemv

    torch._inductor.config.coordinate_descent_tuning = True  # as in the decode benchmark
    dev, dt = torch.device("cuda"), torch.bfloat16
    copy_gbs = copy_bandwidth_gbs()
    results: dict = {"benchmark": "gemv", **environment(), "copy_bandwidth_gbs": copy_gbs, "shapes": []}
    g = torch.Generator(device=dev).manual_seed(0)
    compiled = None if args.no_compile else torch.compile(gemv.fused_linear_ref, dynamic=False)
    for name, N, K, norm, silu, res in SHAPES:
        wbytes = N * K * 2
        copies = max(2, math.ceil(3 * L2_BYTES / wbytes))
        ws = [(torch.randn(N, K, device=dev, generator=g) / K**0.5).to(dt) for _ in range(copies)]
        x = torch.randn(1, 2 * K if silu else K, device=dev, generator=g).to(dt)
        nw = (1 + torch.randn(K, device=dev, generator=g) / 4).to(dt) if norm else None
        r = torch.randn(1, N, device=dev, generator=g).to(dt) if res else None
        kw = dict(norm_weight=nw, eps=1e-5, silu_mul=silu, residual=r)
        want = gemv.fused_linear_ref(x.double(), ws[0].double(), None, norm_weight=None if nw is None else nw.double(),
                                     eps=1e-5, silu_mul=silu, residual=None if r is None else r.double())  # fmt: skip
        row: dict = {"shape": name, "N": N, "K": K, "weight_bytes": wbytes, "copies": copies, "sides": {}}

        def record(side: str, call, err_of=None) -> None:
            try:
                err = None
                if err_of is not None:
                    out = err_of()
                    err = ((out.double() - want).norm() / want.norm()).item()
                    assert err < 1e-2, f"relative error {err}"
                us = _time(lambda: [call(w) for w in ws]) * 1e3 / copies
                gbs = wbytes / us / 1e3
                row["sides"][side] = dict(us=round(us, 3), gbs=round(gbs, 1), pct_copy=round(100 * gbs / copy_gbs, 1),
                                          rel_err=err)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - one failing side must not lose the shape
                row["sides"][side] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
            print(f"  {side:34s} {row['sides'][side]}", flush=True)

        print(name, flush=True)
        record("cuBLAS GEMV alone (F.linear)", lambda w: torch.nn.functional.linear(x[:, :K], w))
        record("eager unfused ops (cuBLAS)", lambda w: gemv.fused_linear_ref(x, w, **kw),
               lambda: gemv.fused_linear_ref(x, ws[0], **kw))
        if compiled is not None:
            record("torch.compile of the unfused ops", lambda w: compiled(x, w, **kw), lambda: compiled(x, ws[0], **kw))
        record("ours, autotuned", lambda w: gemv.fused_linear(x, w, **kw), lambda: gemv.fused_linear(x, ws[0], **kw))
        for cfg in CONFIGS:
            if cfg[1] > 2 * K:
                continue
            record(f"ours {cfg}", lambda w, cfg=cfg: gemv.launch(x, w, None, nw, 1e-5, silu, r, config=cfg),
                   lambda cfg=cfg: gemv.launch(x, ws[0], None, nw, 1e-5, silu, r, config=cfg))
        timed = {k: v for k, v in row["sides"].items() if k.startswith("ours (") and "us" in v}
        row["best_config"] = min(timed, key=lambda k: timed[k]["us"]) if timed else None
        results["shapes"].append(row)
        save_json(results, args.out)
        del ws
        torch.cuda.empty_cache()
    print(f"\ncopy {copy_gbs:.0f} GB/s")
    for row in results["shapes"]:
        s = row["sides"]
        best = s.get(row["best_config"], {})
        print(f"{row['shape']:32s} best ours {row['best_config']} {best.get('us')} us {best.get('pct_copy')}% | "
              + " | ".join(f"{k}: {v.get('us')} us" for k, v in s.items() if not k.startswith("ours (")))
    return results


if __name__ == "__main__":
    main()
