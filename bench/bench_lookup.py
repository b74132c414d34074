"""4-bit code lookup in the kernels: select tree against ``tl.gather`` (``FASTLORA_NF4_LOOKUP``).

For NF4 with double quantisation (blocksize 64, built by ``fastlora.quant.quantize_4bit``; same bytes
as bitsandbytes) and (N, K) in {(4096, 4096), (14336, 4096), (4096, 14336)}, for each lookup in
``fastlora.kernels.NF4_LOOKUPS`` (switched in-process with ``set_nf4_lookup``; Triton compiles and
autotunes one kernel per lookup, the autotune keys include it):

* ``dequant``   ``dequant_4bit`` to bf16: checked ``torch.equal`` against the select tree and against
  ``fastlora.quant.dequantize`` (pure PyTorch, bit-exact to bnb); time and GB/s of packed + output bytes
* ``fwd_kernel`` ``lora_fwd_fused`` alone at M = 16 (x·W0ᵀ + s·xa·Bᵀ, split-K, xa precomputed)
* ``op_fused`` / ``op_cublas``  the whole forward op (``lora_linear_fused`` under ``no_grad``) on the
  fused path and on the dequantise + cuBLAS path
* ``mm_bf16``   ``torch.mm(x, W.t())`` with a bf16 W (the floor)
* ``small``     ``lora_fwd_small`` (the small-M forward) for each of its lookups (``shfl``: the
  warp-shuffle decoder) and both operand orders (``swap``: yᵀ = W0·xᵀ), with ``torch.mm`` on a bf16
  W0 and ``lora_fwd_fused`` as baselines -- timed through CUDA graphs over 8 weight sets, since at
  M = 16 ``do_bench`` measures the host's launch time (``--small-only``: just these)

Every forward output is checked against an fp32 reference (relerr < 1e-2). Times: medians of
``triton.testing.do_bench`` (L2 cleared before every call). Prints a table, writes JSON to ``--out``.

    python -P bench/bench_lookup.py --out bench_lookup.json      # CUDA GPU
    python -P bench/bench_lookup.py --smoke                      # CPU interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
from pathlib import Path

import torch

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # (N, K)
M, R, SCALING, BLOCKSIZE = 16, 16, 2.0, 64
TOL = 1e-2


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_shape(n, k, m, lookups, device, gen, bench, failures) -> dict:
    """One (N, K): build the NF4 weight and inputs, then check and time every lookup."""
    from fastlora.kernels import dequant_4bit, lora_fwd_fused, set_nf4_lookup

    from fastlora.ops import fused
    from fastlora.ops.fused import _weight_of
    from fastlora.quant import dequantize, quantize_4bit

    w32 = torch.randn(n, k, device=device, generator=gen) / math.sqrt(k)
    qw = quantize_4bit(w32, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=True)
    del w32
    w = _weight_of(qw)
    ref_w = dequantize(qw, torch.bfloat16)  # bit-exact to bitsandbytes' dequantize_4bit
    x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
    A = (torch.randn(R, k, device=device, generator=gen) / math.sqrt(k)).to(torch.bfloat16)
    B = (torch.randn(n, R, device=device, generator=gen) * 0.1).to(torch.bfloat16)
    xa = torch.mm(x, A.t())
    y_ref = x.float() @ ref_w.float().t() + SCALING * (xa.float() @ B.float().t())
    bytes_dq = qw.packed.numel() + n * k * 2  # packed codes + bf16 output
    row = dict(N=n, K=k, M=m, dequant_bytes=bytes_dq, mm_bf16_ms=bench(lambda: torch.mm(x, ref_w.t())))
    out_dq = torch.empty(n, k, dtype=torch.bfloat16, device=device)

    def dq():
        return dequant_4bit(
            w.packed, w.absmax, w.quant_type, w.shape, w.blocksize, torch.bfloat16,
            absmax2=w.absmax2, code2=w.code2, blocksize2=w.blocksize2, offset=w.offset, out=out_dq,
        )  # fmt: skip

    def fwd_kernel():
        return lora_fwd_fused(x, w, B, SCALING, xa)

    def op():
        return fused.lora_linear_fused(x, qw, A, B, SCALING)

    select_dq = None
    for lk in lookups:
        set_nf4_lookup(lk)
        r = {}
        try:
            got = dq().clone()
            if lk == "select":
                select_dq = got
            r["dequant_equal_ref"] = bool(torch.equal(got, ref_w))
            r["dequant_equal_select"] = None if select_dq is None else bool(torch.equal(got, select_dq))
            r["dequant_ms"] = bench(dq)
            r["dequant_GBps"] = bytes_dq / (r["dequant_ms"] * 1e-3) / 1e9
            r["fwd_kernel_relerr"] = _relerr(fwd_kernel(), y_ref)
            r["fwd_kernel_ms"] = bench(fwd_kernel)
            with torch.no_grad():
                for path in ("fused", "cublas"):
                    fused.set_path(path)
                    r[f"op_{path}_relerr"] = _relerr(op(), y_ref)
                    r[f"op_{path}_ms"] = bench(op)
            bad = [key for key, v in r.items() if key.endswith("relerr") and not v < TOL]
            bad += [key for key, v in r.items() if key.startswith("dequant_equal") and v is False]
            if bad:
                failures.append(dict(N=n, K=k, lookup=lk, checks=bad))
        except Exception as exc:  # e.g. a lookup that does not compile on this Triton: record it, go on
            lines = str(exc).strip().splitlines()
            r["error"] = f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"
            failures.append(dict(N=n, K=k, lookup=lk, error=r["error"]))
        finally:
            fused.set_path("auto")
        row[lk] = r
    return row


SMALL_LOOKUPS = ("select", "gather", "gather1d", "shfl")
GRAPH_SETS = 8  # distinct weights per CUDA graph: together larger than the H100's 50 MB L2


def run_small(n, k, m, device, gen, failures) -> dict:
    """``lora_fwd_small`` (the small-M forward) for each of its lookups (``shfl`` included) and both
    operand orders, against ``torch.mm`` with a bf16 W0 and the fused GEMM (``lora_fwd_fused``).

    At M = 16 these kernels take 5-50 us of GPU time but a Triton launch costs ~100 us of host time
    here, so ``do_bench`` would time the host: each figure is the GPU time per call of a CUDA graph of
    ``GRAPH_SETS`` calls, each on its own weight (so L2 cannot serve the weight bytes)."""
    from bench_layer import graph_ms
    from fastlora.kernels import lora_fwd_fused, lora_fwd_small

    from fastlora.ops.fused import _weight_of
    from fastlora.quant import dequantize, quantize_4bit

    x = torch.randn(m, k, device=device, generator=gen).to(torch.bfloat16)
    B = (torch.randn(n, R, device=device, generator=gen) * 0.1).to(torch.bfloat16)
    xa = torch.randn(m, R, device=device, generator=gen).to(torch.bfloat16)
    ws, dense = [], []
    for _ in range(GRAPH_SETS if device == "cuda" else 1):
        qw = quantize_4bit(torch.randn(n, k, device=device, generator=gen) / math.sqrt(k), blocksize=BLOCKSIZE,
                           quant_type="nf4", compress_statistics=True)  # fmt: skip
        ws.append(_weight_of(qw))
        dense.append(dequantize(qw, torch.bfloat16))
    y_ref = x.float() @ dense[0].float().t() + SCALING * (xa.float() @ B.float().t())

    def timed(make) -> float:
        if device != "cuda":  # smoke: run once, time nothing meaningful
            make(0)()
            return float("nan")
        return graph_ms([make(i) for i in range(len(ws))])

    out = dict(
        mm_bf16_ms=timed(lambda i: lambda: torch.mm(x, dense[i].t())),
        fused_select_ms=timed(lambda i: lambda: lora_fwd_fused(x, ws[i], B, SCALING, xa)),
    )
    variants = [(lk, swap, True) for lk in SMALL_LOOKUPS for swap in (True, False)]
    variants += [(lk, swap, False) for lk in SMALL_LOOKUPS if lk != "shfl" for swap in (True, False)]
    for lk, swap, slots in variants:
        key = f"{lk}-{'swap' if swap else 'noswap'}{'' if slots else '-cols'}"

        def make(i, lk=lk, swap=swap, slots=slots):
            return lambda: lora_fwd_small(x, ws[i], B, SCALING, xa, swap=swap, slots=slots, lookup=lk)

        try:
            out[key] = dict(relerr=_relerr(make(0)(), y_ref), ms=timed(make))
            if not out[key]["relerr"] < TOL:
                failures.append(dict(N=n, K=k, small=key, relerr=out[key]["relerr"]))
        except Exception as exc:  # a variant that does not compile on this Triton: record it, go on
            lines = str(exc).strip().splitlines()
            out[key] = dict(error=f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}")
            failures.append(dict(N=n, K=k, small=key, error=out[key]["error"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_lookup.json")
    ap.add_argument("--lookups", default=None, help="comma-separated subset of NF4_LOOKUPS (default: all)")
    ap.add_argument("--shapes", default=None, help="NxK list, e.g. 4096x4096,14336x4096")
    ap.add_argument("--m", type=int, default=M, help="rows of x for the forward (default 16)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes: checks the script")
    ap.add_argument("--small-only", action="store_true", help="only the small-M kernel's variants (CUDA graphs)")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before fastlora.kernels is imported
        device, shapes = "cpu", [(72, 136), (40, 264)]
    elif not torch.cuda.is_available():
        print("bench_lookup: needs a CUDA GPU (or --smoke for a CPU check of the script)", file=sys.stderr)
        return 2
    else:
        device, shapes = "cuda", list(SHAPES)
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    import triton
    from fastlora.kernels import NF4_LOOKUPS, nf4_lookup, set_nf4_lookup

    from fastlora.ops import fused

    lookups = args.lookups.split(",") if args.lookups else list(NF4_LOOKUPS)
    for lk in lookups:
        if lk not in NF4_LOOKUPS:
            ap.error(f"unknown lookup {lk!r}; known: {', '.join(NF4_LOOKUPS)}")
    torch.backends.cuda.matmul.allow_tf32 = False
    initial = nf4_lookup()

    def bench(fn) -> float:
        if device != "cuda":  # smoke: run once, time nothing meaningful
            import time

            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e3
        return triton.testing.do_bench(fn, rep=args.rep, return_mode="median")

    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
        torch=torch.__version__, triton=triton.__version__, m=args.m, r=R, scaling=SCALING, blocksize=BLOCKSIZE,
        quant="nf4, double quantisation", lookups=lookups,
        env={k: v for k, v in os.environ.items() if k.startswith(("FASTLORA", "TRITON"))},
    )  # fmt: skip
    print(json.dumps(meta), flush=True)
    results = []
    failures = []

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(meta=meta, results=results, failures=failures), indent=1))

    gen = torch.Generator(device=device).manual_seed(0)
    for n, k in shapes:
        row = {} if args.small_only else run_shape(n, k, args.m, lookups, device, gen, bench, failures)
        row.update(N=n, K=k, small=run_small(n, k, args.m, device, gen, failures))
        set_nf4_lookup(initial)
        fused.set_path("auto")
        results.append(row)
        save()
        if device == "cuda":
            torch.cuda.empty_cache()

    # table
    hdr = (f"{'N':>6} {'K':>6} {'lookup':>9} | {'dequant us':>10} {'GB/s':>7} {'eq':>3} | {'fwd kern us':>11} "
           f"{'op fused us':>11} {'op cublas us':>12} | {'mm bf16 us':>10} {'max relerr':>10}")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for row in results if not args.small_only else []:
        for lk in lookups:
            r = row[lk]
            if "error" in r:
                print(f"{row['N']:>6} {row['K']:>6} {lk:>9} | ERROR {r['error']}")
                continue
            eq = "yes" if r["dequant_equal_ref"] and r["dequant_equal_select"] is not False else "NO"
            err = max(r["fwd_kernel_relerr"], r["op_fused_relerr"], r["op_cublas_relerr"])
            print(f"{row['N']:>6} {row['K']:>6} {lk:>9} | {r['dequant_ms'] * 1e3:>10.1f} {r['dequant_GBps']:>7.0f} "
                  f"{eq:>3} | {r['fwd_kernel_ms'] * 1e3:>11.1f} {r['op_fused_ms'] * 1e3:>11.1f} "
                  f"{r['op_cublas_ms'] * 1e3:>12.1f} | {row['mm_bf16_ms'] * 1e3:>10.1f} {err:>10.2e}")  # fmt: skip
    print(f"\nCUDA graphs, GPU us per call (x torch.mm bf16), M = {args.m}: lora_fwd_small variants, lora_fwd_fused")
    for row in results:
        sm = row["small"]
        cells = [f"mm_bf16={sm['mm_bf16_ms'] * 1e3:.1f}", f"fused={sm['fused_select_ms'] * 1e3:.1f}"]
        for key, r in sm.items():
            if isinstance(r, dict):
                cells.append(
                    f"{key}=ERROR" if "error" in r else f"{key}={r['ms'] * 1e3:.1f} ({r['ms'] / sm['mm_bf16_ms']:.2f}x)"
                )
        print(f"{row['N']:>6} {row['K']:>6} | " + "  ".join(cells))
    save()
    print(f"wrote {args.out}")
    if failures:
        print(f"FAILED checks: {json.dumps(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
