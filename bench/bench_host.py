"""Host (CPU) time of one LoRA layer's forward+backward: fastlora vs PEFT + bnb vs Unsloth's ``LoRA_W``.

One linear layer 4096 -> 4096, r = 16, alpha = 32, bf16 activations; base NF4 (bitsandbytes
``Linear4bit``, double quantisation, the same storage in every arm) or bf16; M in {16, 4096, 16384}
tokens; LoRA dropout 0 and 0.1. Arms, each used as a user would:

* ``fastlora``  a :class:`fastlora.LoraLinear` around the base layer (fp32 adapters, the default);
* ``peft``      PEFT's LoRA layer around the same base layer (fp32 adapters, PEFT's default);
* ``unsloth``   Unsloth's ``LoRA_W.apply`` on the PEFT layer's parameters (``get_lora_parameters``), as
                its patched attention calls it (``--peer DIR`` puts Unsloth's functions on the path);
* ``floor``     two bare bf16 cuBLAS calls, ``x·W0ᵀ`` and ``dy·W0`` (no autograd): the host cost of a
                launch on this machine, and the GPU time any method needs at least;
* ``fl-compiled`` (``--compiled M ...``, dropout 0) the fastlora layer under
                ``torch.compile(mode="reduce-overhead")``: Inductor launches the kernels from CUDA graphs.

Per arm: ``host_us`` -- N forward+backward calls queued without any sync, wall time of the Python
loop divided by N, while the GPU is held busy by a long sleep kernel (so the host never waits for
the GPU: this is what the CPU spends per call); ``gpu_us`` -- the GPU time of the same N calls
(CUDA events from the end of the sleep to the end of the last call: back-to-back kernels, no host
gaps) divided by N; ``kernels`` -- CUDA kernels per call (torch.profiler). A call computes dx, dA and
dB (``torch.autograd.grad``, no gradient accumulation). Writes ``--out`` (JSON) and prints a table.

    python bench/bench_host.py --peer .peer                     # the full table
    python bench/bench_host.py --ms 4096 --bases nf4 --profile  # + a cProfile of fastlora's call
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
from common import OneLayer, queued, sleep_cycles_per_ms

K = N = 4096
R, ALPHA = 16, 32.0


def _layers(base: str, m: int, p: float, peer: str | None, compiled: bool = False):
    """``{arm: call}`` where ``call()`` runs one forward+backward of that arm on the same weights."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    import fastlora
    from fastlora.layer import LoraLinear

    dev, dt = "cuda", torch.bfloat16
    w = (torch.randn(N, K, device=dev) / math.sqrt(K)).to(dt)
    if base == "nf4":
        lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dt, compress_statistics=True, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4")
        lin = lin.to(dev)
    else:
        lin = torch.nn.Linear(K, N, bias=False, device=dev, dtype=dt)
        lin.weight.data.copy_(w)
    lin.requires_grad_(False)

    peft_model = get_peft_model(
        OneLayer(lin), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["lin"], lora_dropout=p)
    )
    peft_model.train()
    peft_layer = peft_model.base_model.model.lin
    pa, pb = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
    with torch.no_grad():
        pb.normal_(std=0.02)
    fl = LoraLinear(lin, r=R, lora_alpha=ALPHA, dropout=p).to(dev).train()
    with torch.no_grad():
        fl.lora_A.copy_(pa)
        fl.lora_B.copy_(pb)
    fastlora.set_backend("auto")

    x = torch.randn(1, m, K, device=dev, dtype=dt, requires_grad=True)
    dy = torch.randn(1, m, N, device=dev, dtype=dt)

    def run(fn, params):
        def call():
            y = fn(x)
            return torch.autograd.grad(y, [x, *params], dy)

        return call

    x2, dy2 = x.detach().reshape(m, K), dy.reshape(m, N)
    arms = {
        "fastlora": run(fl, [fl.lora_A, fl.lora_B]),
        "peft": run(peft_model, [pa, pb]),
        "floor": lambda: (torch.mm(x2, w.t()), torch.mm(dy2, w)),
    }
    if p == 0.0:  # the op alone (no LoraLinear module), with each way of merging the forward's LoRA term
        from fastlora.ops.fused import MERGES, lora_linear_fused

        for merge in MERGES:
            arms[f"op-{merge}"] = run(
                lambda x, merge=merge: lora_linear_fused(
                    x, fl.base_weight(), fl.lora_A, fl.lora_B, fl.scaling, merge=merge
                ),
                [fl.lora_A, fl.lora_B],
            )
    if compiled and p == 0.0:  # Inductor's CUDA graphs of the same layer
        arms["fl-compiled"] = run(torch.compile(fl, mode="reduce-overhead"), [fl.lora_A, fl.lora_B])
    if peer:
        sys.path.insert(0, str(Path(peer).resolve()))
        from unsloth.kernels.fast_lora import LoRA_W
        from unsloth.kernels.utils import get_lora_parameters

        def unsloth(x):
            W, W_quant, A, B, S = get_lora_parameters(peft_layer)
            if p > 0:
                return LoRA_W.apply(x, W, W_quant, A, B, S, p, None)
            return LoRA_W.apply(x, W, W_quant, A, B, S)

        arms["unsloth"] = run(unsloth, [pa, pb])
    return arms


def measure(call, calls: int, cycles_per_ms: float) -> dict:
    """Host and GPU time per call of ``call`` (see the module docstring)."""
    for _ in range(5):  # warm-up (a compiled arm compiles and records its CUDA graphs here)
        call()
    torch.cuda.synchronize()
    # Hold the GPU for longer than the host needs to queue every call: the host never waits on it.
    t = time.perf_counter()
    call()
    torch.cuda.synchronize()
    one = (time.perf_counter() - t) * 1e3
    host_ms, gpu_ms = queued(call, calls, one, cycles_per_ms)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return dict(host_us=host_ms * 1e3, gpu_us=gpu_ms * 1e3, kernels=kernels)


def cprofile(call, calls: int = 50) -> str:
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        call()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ms", type=int, nargs="+", default=[16, 4096, 16384])
    ap.add_argument("--bases", nargs="+", default=["nf4", "bf16"], choices=["nf4", "bf16"])
    ap.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--peer", type=str, default=None, help="folder holding Unsloth's unsloth/ package")
    ap.add_argument(
        "--compiled", type=int, nargs="*", default=[], help="add the fl-compiled arm at these M (dropout 0)"
    )
    ap.add_argument("--profile", action="store_true", help="print a cProfile of fastlora's call per case")
    ap.add_argument("--out", type=str, default=str(Path(__file__).parent / "results" / "host.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_host: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        K=K, N=N, r=R, alpha=ALPHA, calls=args.calls,
    )  # fmt: skip
    print(json.dumps(meta), flush=True)
    cpm = sleep_cycles_per_ms()
    rows = []
    for base in args.bases:
        for p in args.dropouts:
            for m in args.ms:
                arms = _layers(base, m, p, args.peer, m in args.compiled)
                for arm, call in arms.items():
                    try:
                        res = measure(call, args.calls, cpm)
                    except Exception as exc:  # an arm that cannot run this case is reported, not fatal
                        res = dict(error=f"{type(exc).__name__}: {str(exc)[:200]}")
                    rows.append(dict(base=base, M=m, dropout=p, arm=arm, **res))
                    print(json.dumps(rows[-1]), flush=True)
                    if args.profile and arm == "fastlora":
                        print(cprofile(call), flush=True)
                del arms
                torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    names = [
        a
        for a in ("fastlora", "op-auto", "op-cat", "op-addmm", "fl-compiled", "peft", "unsloth", "floor")
        if any(r["arm"] == a for r in rows)
    ]
    print(f"\n{'base':5s} {'p':>4s} {'M':>6s} | " + " | ".join(f"{a:>22s}" for a in names))
    print(f"{'':5s} {'':>4s} {'':>6s} | " + " | ".join(f"{'host us gpu us kern':>22s}" for _ in names))
    for base in args.bases:
        for p in args.dropouts:
            for m in args.ms:
                cells = []
                for arm in names:
                    r = next(
                        (r for r in rows if (r["base"], r["dropout"], r["M"], r["arm"]) == (base, p, m, arm)), None
                    )
                    if r is None or "error" in r:
                        cells.append(f"{'-' if r is None else 'error':>22s}")
                    else:
                        cells.append(f"{r['host_us']:7.0f} {r['gpu_us']:7.0f} {r['kernels']:6d}")
                print(f"{base:5s} {p:4.2f} {m:6d} | " + " | ".join(cells))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
