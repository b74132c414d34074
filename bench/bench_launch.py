"""Host cost of the pieces of one LoRA layer call: what a launch costs on this machine.

Each item is called N times queued behind a long GPU sleep (the host never waits on the GPU) and the
Python loop's wall time is divided by N (µs per call). Items:

* ``mm``                 one bf16 cuBLAS GEMM (16×4096 · 4096×4096): the floor of any launch
* ``triton-empty``       an empty Triton kernel with the dequantisation kernel's argument list,
                         launched ``kernel[grid](...)`` (Triton's launcher: binding, specialisation,
                         cache lookup, driver launch)
* ``dequant-kernel``     ``_dequant4_kernel[grid](...)`` with precomputed arguments (NF4 4096², nested)
* ``dequant_4bit``       the public wrapper (argument checks, views, then the launch)
* ``bnb-dequant``        ``bitsandbytes.functional.dequantize_4bit`` of the same weight (its CUDA path)
* ``from_bnb``, ``packed_weight``   building the op's view of the 4-bit weight from the module
* ``seed``               ``torch.randint`` of a dropout seed on the GPU
* ``autograd-noop``      an identity ``autograd.Function`` forward + backward
* ``layer-fwd``          ``LoraLinear`` forward under ``no_grad`` (NF4, M = 4096)
* ``layer-fwd-bwd``      ``LoraLinear`` forward + ``autograd.grad`` (NF4, M = 4096)

    python bench/bench_launch.py --out bench/results/launch.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl
from common import queued, sleep_cycles_per_ms

K = N = 4096


@triton.jit
def _empty_kernel(q, a, a2, c2, o, out, s, n, k, NESTED: tl.constexpr, BS: tl.constexpr, BLOCK: tl.constexpr):
    pass


def host_us(call, calls: int, cpm: float) -> float:
    for _ in range(5):
        call()
    torch.cuda.synchronize()
    t = time.perf_counter()
    call()
    torch.cuda.synchronize()
    return queued(call, calls, (time.perf_counter() - t) * 1e3, cpm)[0] * 1e3


def items():
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from fastlora.kernels import dequant_packed
    from fastlora.kernels.dequant import _BLOCK_K, _BLOCK_R, _WARPS, _dequant4_kernel

    from fastlora.layer import LoraLinear
    from fastlora.ops.fused import packed_weight
    from fastlora.quant import from_bnb

    dev, dt = "cuda", torch.bfloat16
    w = (torch.randn(N, K) / math.sqrt(K)).to(dt)
    lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dt, compress_statistics=True, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True, quant_type="nf4")
    lin = lin.to(dev).requires_grad_(False)
    qw = from_bnb(lin)
    pw = packed_weight(qw)
    out = torch.empty(N, K, dtype=dt, device=dev)
    x16 = torch.randn(16, K, device=dev, dtype=dt)
    wd = w.to(dev)
    grid = (triton.cdiv(N, _BLOCK_R), triton.cdiv(K, _BLOCK_K))
    args = (pw.packed.reshape(-1), pw.absmax.reshape(-1), pw.absmax2, pw.code2, pw.offset, out, out.stride(0), N, K)
    consts = dict(
        NESTED=True, EVEN_K=True, K_ALIGNED=True, QTYPE=0, BS=pw.blocksize, BS2=pw.blocksize2, LOOKUP=1,
        BLOCK_R=_BLOCK_R, BLOCK_K=_BLOCK_K, num_warps=_WARPS,
    )  # fmt: skip
    fl = LoraLinear(lin, r=16, lora_alpha=32).to(dev).train()
    with torch.no_grad():
        fl.lora_B.normal_(std=0.02)
    x = torch.randn(4096, K, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(4096, N, device=dev, dtype=dt)

    class Noop(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, g):
            return g

    def noop():
        y = Noop.apply(x)
        return torch.autograd.grad(y, [x], dy)

    def fwd():
        with torch.no_grad():
            return fl(x)

    def fwd_bwd():
        return torch.autograd.grad(fl(x), [x, fl.lora_A, fl.lora_B], dy)

    return {
        "mm": lambda: torch.mm(x16, wd.t()),
        "triton-empty": lambda: _empty_kernel[grid](*args, NESTED=True, BS=64, BLOCK=64),
        "dequant-kernel": lambda: _dequant4_kernel[grid](*args, **consts),
        "dequant_4bit": lambda: dequant_packed(pw, dt, out),
        "bnb-dequant": lambda: F.dequantize_4bit(lin.weight.data, lin.weight.quant_state, out=out),
        "from_bnb": lambda: from_bnb(lin),
        "packed_weight": lambda: packed_weight(from_bnb(lin)),
        "seed": lambda: torch.randint(0, 2**31 - 1, (1,), dtype=torch.int32, device=dev),
        "autograd-noop": noop,
        "layer-fwd": fwd,
        "layer-fwd-bwd": fwd_bwd,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3, help="median of this many timings per item")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of layer-fwd-bwd")
    ap.add_argument("--out", type=str, default=str(Path(__file__).parent / "results" / "launch.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_launch: needs a CUDA GPU", file=sys.stderr)
        return 2
    cpm = sleep_cycles_per_ms()
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, calls=args.calls,
    )  # fmt: skip
    rows = {}
    for name, call in items().items():
        try:
            times = sorted(host_us(call, args.calls, cpm) for _ in range(args.repeats))
            rows[name] = times[len(times) // 2]
        except Exception as exc:  # reported, not fatal: one item's failure says something too
            rows[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
        print(f"{name:16s} {rows[name] if isinstance(rows[name], str) else f'{rows[name]:8.1f} us'}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, host_us=rows), indent=1))
    if args.profile:
        import cProfile
        import pstats

        call = items()["layer-fwd-bwd"]
        for _ in range(5):
            call()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            call()
        prof.disable()
        torch.cuda.synchronize()
        for key in ("tottime", "cumtime"):
            pstats.Stats(prof).sort_stats(key).print_stats(35)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tprof:
            for _ in range(10):
                call()
            torch.cuda.synchronize()
        print(tprof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
