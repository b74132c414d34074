"""One LoRA/QLoRA linear layer: fastlora's Triton op against cuBLAS and PEFT (issue 3's benchmark).

For M in {16, 512, 4096, 16384} × (K, N) in {(4096, 4096), (4096, 14336), (14336, 4096)}, r = 16, bf16:

* ``floor``      bare bf16 cuBLAS: ``x·W0ᵀ`` (forward), plus ``dy·W0`` (forward+backward)
* ``peft_nf4``   PEFT LoRA on a bitsandbytes ``Linear4bit`` (nf4, double quantisation)
* ``peft_bf16``  PEFT LoRA on a bf16 ``nn.Linear``
* ``fl_nf4_*`` / ``fl_bf16_*``  fastlora's op on the same bnb storage / the same bf16 weight, for the
  automatic choice (``auto``) and each forward merge of the LoRA term forced (``cat``: one GEMM over
  ``[x | s·xa]``; ``addmm``: a cuBLAS epilogue on y)

Forward is timed under ``torch.no_grad()``; forward+backward computes grads of x, A and B (never of W0).
Times are medians of ``triton.testing.do_bench`` (CUDA events; it clears L2 before every call, and that
clearing kernel also hides host launch latency). "Peak extra" is ``max_memory_allocated`` during one
forward+backward minus what was allocated before it (inputs, weights and LoRA params excluded; outputs
and grads included for every method alike). Every fastlora variant is also checked against an fp32
ground truth at every shape (relerr of y, dx, dA, dB).

    python bench/bench_layer.py                 # all shapes, table + JSON (bench/results/layer.json)
    python bench/bench_layer.py --quick         # M in {16, 4096}, first shape only
    pytest bench/test_bench_layer.py --benchmark-only   # the same cases through pytest-benchmark
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
from common import OneLayer

R = 16
SCALING = 2.0
MS = (16, 512, 4096, 16384)
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))
VARIANTS = ("auto", "cat", "addmm")


DEVICE = "cuda"


def do_bench(fn, warmup: int = 10, rep: int = 60) -> float:
    if DEVICE != "cuda":  # --smoke on CPU: exercise the code, time nothing meaningful
        import time

        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def _peak_extra(fn) -> float:
    if DEVICE != "cuda":
        fn()
        return 1.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / 2**20


def graph_ms(fns) -> float | None:
    """Per-call GPU time of ``fns`` (one call each, on distinct weights so that L2 cannot hold them)
    captured in one CUDA graph: no host launch overhead in the number."""
    if DEVICE != "cuda":
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for f in fns:
                f()
        return do_bench(graph.replay) / len(fns)
    except Exception as exc:  # a baseline that cannot be captured
        print(f"  (graph capture failed: {type(exc).__name__}: {exc})")
        return None


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Case:
    """Inputs of one shape: x, dy, a bf16 W0, the bnb NF4 layer made from it, A and B."""

    def __init__(self, m: int, k: int, n: int, device: str | None = None):
        import bitsandbytes as bnb

        from fastlora.quant import from_bnb

        device = device or DEVICE
        self.m, self.k, self.n = m, k, n
        dt = torch.bfloat16
        self.x = torch.randn(m, k, device=device, dtype=dt)
        self.dy = torch.randn(m, n, device=device, dtype=dt)
        self.w = (torch.randn(n, k, device=device) / math.sqrt(k)).to(dt)
        lin4 = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dt, compress_statistics=True, quant_type="nf4")
        lin4.weight = bnb.nn.Params4bit(self.w.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4")
        self.lin4 = lin4.to(device)
        self.qw = from_bnb(self.lin4)
        self.A = (torch.randn(R, k, device=device) / math.sqrt(k)).to(dt)
        self.B = (torch.randn(n, R, device=device) * 0.1).to(dt)

    # -- floor ---------------------------------------------------------------------------------
    def floor(self):
        x, w, dy = self.x, self.w, self.dy
        return (lambda: torch.mm(x, w.t())), (lambda: (torch.mm(x, w.t()), torch.mm(dy, w)))

    # -- PEFT ----------------------------------------------------------------------------------
    def peft(self, quant: bool):
        from peft import LoraConfig, get_peft_model

        if quant:
            base = self.lin4
        else:
            base = torch.nn.Linear(self.k, self.n, bias=False, device=self.x.device, dtype=torch.bfloat16)
            base.weight.data.copy_(self.w)
        cfg = LoraConfig(r=R, lora_alpha=R * SCALING, target_modules=["lin"], lora_dropout=0.0)
        model = get_peft_model(OneLayer(base), cfg, autocast_adapter_dtype=False)  # bf16 adapters, no casts
        lyr = model.base_model.model.lin
        lyr.lora_A["default"].weight.data.copy_(self.A)
        lyr.lora_B["default"].weight.data.copy_(self.B)
        params = [lyr.lora_A["default"].weight, lyr.lora_B["default"].weight]
        x = self.x.detach().requires_grad_()
        dy = self.dy

        def fwd():
            with torch.no_grad():
                return model(self.x)

        def fb():
            y = model(x)
            return torch.autograd.grad(y, [x, *params], dy)

        return fwd, fb, model

    # -- fastlora ------------------------------------------------------------------------------
    def fastlora(self, quant: bool, variant: str):
        from fastlora.ops import fused

        base = self.qw if quant else self.w
        x = self.x.detach().requires_grad_()
        A = self.A.detach().requires_grad_()
        B = self.B.detach().requires_grad_()
        dy = self.dy

        def fwd():
            with torch.no_grad():
                return fused.lora_linear_fused(self.x, base, self.A, self.B, SCALING, merge=variant)

        def fb():
            y = fused.lora_linear_fused(x, base, A, B, SCALING, merge=variant)
            return (y, *torch.autograd.grad(y, [x, A, B], dy))

        return fwd, fb

    def truth(self, quant: bool):
        """fp32 ground truth (TF32 off) of y, dx, dA, dB with W0 as the op sees it."""
        from fastlora.quant import dequantize

        w0 = (dequantize(self.qw, torch.bfloat16) if quant else self.w).float()
        x, dy, A, B = self.x.float(), self.dy.float(), self.A.float(), self.B.float()
        xa = x @ A.t()
        y = x @ w0.t() + SCALING * xa @ B.t()
        g = dy @ B
        return y, dy @ w0 + SCALING * g @ A, SCALING * g.t() @ x, SCALING * dy.t() @ xa


def run_shape(m, k, n, variants, log):
    case = Case(m, k, n)
    res = dict(M=m, K=k, N=n, r=R)
    ffwd, ffb = case.floor()
    res["floor"] = dict(fwd_ms=do_bench(ffwd), fb_ms=do_bench(ffb), peak_mb=_peak_extra(ffb))
    for quant in (True, False):
        tag = "nf4" if quant else "bf16"
        fwd, fb, model = case.peft(quant)
        res[f"peft_{tag}"] = dict(fwd_ms=do_bench(fwd), fb_ms=do_bench(fb), peak_mb=_peak_extra(fb))
        del model, fwd, fb
        truth = case.truth(quant)
        for v in variants:
            fwd, fb = case.fastlora(quant, v)
            out = fb()  # first call: compilation + correctness
            errs = [_relerr(a, b) for a, b in zip(out, truth)]
            del out
            res[f"fl_{tag}_{v}"] = dict(
                fwd_ms=do_bench(fwd), fb_ms=do_bench(fb), peak_mb=_peak_extra(fb), relerr=max(errs)
            )
        del truth
    fl = res["floor"]
    for key, val in res.items():
        if isinstance(val, dict) and key not in ("floor", "graph_fwd_ms"):
            val["fwd_x_floor"] = val["fwd_ms"] / fl["fwd_ms"]
            val["fb_x_floor"] = val["fb_ms"] / fl["fb_ms"]
    if m <= 64 and DEVICE == "cuda":
        res["graph_fwd_ms"] = graph_fwd(case)
        log(
            "  cuda-graph fwd ms (8 weight sets): "
            + ", ".join(f"{k}={v:.4f}" for k, v in res["graph_fwd_ms"].items() if v)
        )
    log(_format_shape(res))
    del case
    _empty_cache()
    return res


def _empty_cache():
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def graph_fwd(case: Case, sets: int = 8) -> dict:
    """Forward of the decode-sized case through CUDA graphs over ``sets`` distinct weights."""
    cases = [case] + [Case(case.m, case.k, case.n) for _ in range(sets - 1)]
    out = dict(floor=graph_ms([c.floor()[0] for c in cases]))
    for quant in (True, False):
        tag = "nf4" if quant else "bf16"
        peft = [c.peft(quant) for c in cases]
        out[f"peft_{tag}"] = graph_ms([p[0] for p in peft])
        del peft
        for v in ("auto", "cat"):
            out[f"fl_{tag}_{v}"] = graph_ms([c.fastlora(quant, v)[0] for c in cases])
    del cases
    _empty_cache()
    return out


def _format_shape(res) -> str:
    lines = [f"M={res['M']:>5} K={res['K']:>5} N={res['N']:>5}   floor fwd {res['floor']['fwd_ms']:.4f} ms  "
             f"fwd+bwd {res['floor']['fb_ms']:.4f} ms  peak {res['floor']['peak_mb']:.0f} MB"]  # fmt: skip
    peft = {q: res[f"peft_{q}"] for q in ("nf4", "bf16")}
    for key, val in res.items():
        if not isinstance(val, dict) or key in ("floor", "graph_fwd_ms"):
            continue
        q = "nf4" if "nf4" in key else "bf16"
        extra = f" err {val['relerr']:.1e}" if "relerr" in val else ""
        vs = ""
        if key.startswith("fl_"):
            vs = (f"  | vs peft_{q}: fwd {peft[q]['fwd_ms'] / val['fwd_ms']:5.2f}x faster, "
                  f"fb {peft[q]['fb_ms'] / val['fb_ms']:5.2f}x, mem {val['peak_mb'] / peft[q]['peak_mb']:.2f}")  # fmt: skip
        lines.append(
            f"  {key:<22} fwd {val['fwd_ms']:8.4f} ms ({val['fwd_x_floor']:5.2f}x)  "
            f"fb {val['fb_ms']:8.4f} ms ({val['fb_x_floor']:5.2f}x)  peak {val['peak_mb']:7.0f} MB{extra}{vs}"
        )
    return "\n".join(lines)


def parts(log):
    """Time the pieces of the cuBLAS path separately (where the time over the floor goes)."""
    from fastlora.kernels import dequant_4bit, lora_bwd_aux, lora_down, lora_up_add

    out = []
    for m in (4096, 16384):
        for k, n in SHAPES:
            c = Case(m, k, n)
            q = c.qw
            xa, _ = lora_down(c.x, c.A)
            row = dict(M=m, K=k, N=n)
            row["dequant"] = do_bench(lambda q=q: dequant_4bit(q.packed, q.absmax, q.quant_type, q.shape, q.blocksize,
                torch.bfloat16, absmax2=q.absmax2, code2=q.code2, offset=q.offset))  # fmt: skip
            row["down"] = do_bench(lambda c=c: lora_down(c.x, c.A))
            row["down_cat"] = do_bench(lambda c=c: lora_down(c.x, c.A, cat_width=R, scaling=SCALING))
            row["bwd_aux"] = do_bench(lambda c=c, xa=xa: lora_bwd_aux(c.dy, c.x, xa, c.A, c.B, SCALING))
            y = torch.mm(c.x, c.w.t())
            row["up_add_y"] = do_bench(lambda y=y, c=c, xa=xa: lora_up_add(y, xa, c.B.t(), SCALING))
            row["mm_fwd"] = do_bench(lambda c=c: torch.mm(c.x, c.w.t()))
            row["mm_dx"] = do_bench(lambda c=c: torch.mm(c.dy, c.w))
            row["xA_torch"] = do_bench(lambda c=c: torch.mm(c.x, c.A.t()))
            row["dyB_torch"] = do_bench(lambda c=c: torch.mm(c.dy, c.B))
            log(
                "  parts "
                + " ".join(f"{kk}={vv:.4f}" if isinstance(vv, float) else f"{kk}={vv}" for kk, vv in row.items())
            )
            out.append(row)
            del c, y
            _empty_cache()
    return out


def host_profile(log, m: int = 16, k: int = 4096, n: int = 4096, calls: int = 50) -> dict:
    """Host (CPU) time per call of each method at a decode-sized M: launches are queued without
    syncing, so when the GPU work is shorter than the Python path this is the host cost. Also a
    cProfile of fastlora's NF4 forward+backward (top functions by own time)."""
    import cProfile
    import io
    import pstats
    import time

    case = Case(m, k, n)
    methods = dict(floor=case.floor())
    for quant in (True, False):
        tag = "nf4" if quant else "bf16"
        p = case.peft(quant)
        methods[f"peft_{tag}"] = (p[0], p[1])
        methods[f"fl_{tag}_auto"] = case.fastlora(quant, "auto")
    out = {}
    for name, (fwd, fb) in methods.items():
        for kind, fn in (("fwd", fwd), ("fb", fb)):
            fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            out[f"{name}_{kind}_host_us"] = (time.perf_counter() - t) / calls * 1e6
            torch.cuda.synchronize()
    log(f"host us/call (M={m}, {k}x{n}): " + ", ".join(f"{kk}={v:.0f}" for kk, v in out.items()))
    prof = cProfile.Profile()
    fb = methods["fl_nf4_auto"][1]
    prof.enable()
    for _ in range(calls):
        fb()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
    out["profile_fl_nf4_fb"] = buf.getvalue()
    log(buf.getvalue()[-4000:])
    return out


def ceilings(log):
    a = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a))
    bw = 2 * a.numel() * 4 / (t * 1e-3) / 1e9  # GB/s, read + write (t in ms)
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t2 = do_bench(lambda: x @ x)
    tf = 2 * 8192**3 / t2 / 1e9
    log(f"ceilings: copy {bw:.0f} GB/s (read+write), bf16 8192^3 matmul {tf:.0f} TFLOP/s")
    return dict(copy_GBps=bw, mm_TFLOPs=tf)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ms", type=int, nargs="*", default=None)
    ap.add_argument("--shapes", type=str, default=None, help="e.g. 4096x4096,14336x4096 (K x N)")
    ap.add_argument("--variants", type=str, default=",".join(VARIANTS))
    ap.add_argument("--no-parts", action="store_true")
    ap.add_argument("--host", action="store_true", help="also measure host time per call and profile it")
    ap.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny shapes: checks the script runs")
    ap.add_argument("--out", type=str, default=str(Path(__file__).parent / "results" / "layer.json"))
    args = ap.parse_args(argv)
    global DEVICE, R
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE, R = "cpu", 8
        args.ms, args.shapes, args.no_parts = [17, 80], "72x40", True
    elif not torch.cuda.is_available():
        print("bench_layer: needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    ms = args.ms or ((16, 4096) if args.quick else MS)
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    variants = args.variants.split(",")

    import triton

    def log(s):
        print(s, flush=True)

    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke)", torch=torch.__version__, triton=triton.__version__, r=R, scaling=SCALING,
        env={k: v for k, v in os.environ.items() if k.startswith("FASTLORA")},
    )  # fmt: skip
    log(json.dumps(meta))
    meta["ceilings"] = ceilings(log) if DEVICE == "cuda" else {}
    results = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every shape, so a run cut short keeps what it measured
        Path(args.out).write_text(json.dumps(dict(meta=meta, results=results), indent=1))

    for k, n in shapes:
        for m in ms:
            results.append(run_shape(m, k, n, variants, log))
            save()
    if args.host and DEVICE == "cuda":
        meta["host"] = host_profile(log)
        save()
    meta["parts"] = [] if args.no_parts or args.quick else parts(log)
    save()
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
