"""Host and GPU time of one Llama decoder layer's forward+backward: fastlora vs Unsloth vs PEFT + bnb.

Where ``bench/train_step.py`` times whole steps (host and GPU mixed, and this VM's host noise on
top), this script separates them for one decoder layer of each ``train_step`` shape (1B, 3B, 8B;
NF4 with double quantisation, r = 16 on every linear, the same weights and A, B in every arm):

    host_us   the CPU time of one layer forward + backward: a few calls queued behind a GPU sleep
              kernel longer than the host needs, so the host never waits on the GPU (``common.queued``;
              no more calls than CUDA's launch queue holds), the median of ``--reps`` such loops
    gpu_us    the GPU time of the same calls, back to back (CUDA events)
    kernels   CUDA kernels per call (torch.profiler)

A call is ``layer(x, position_embeddings=(cos, sin))`` on ``[batch, seq, hidden]`` bf16 activations
(the shape's tokens per step) and ``torch.autograd.grad`` of it with respect to x and the layer's
LoRA parameters. Arms are ``train_step``'s (``--arms``) plus ``nolora-nf4``: the bitsandbytes NF4
layer without any adapter (gradient for x only) -- the attention, norms, rotary and base GEMMs every
arm pays -- and ``fastlora-nf4-nofold``: the default fastlora layer with the grouped ops' forward
adding each member's LoRA term to its output instead of folding it into the base GEMM
(``fastlora.grouped.FOLD_FORWARD``). In a training step a layer costs about max(host_us, gpu_us).

    python bench/bench_block.py --peer .peer --json bench/results/block.json
    python bench/bench_block.py --tiny            # CPU smoke run: host time only, small shapes
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import types
from pathlib import Path

import torch
from common import quantize_linears, queued, sleep_cycles_per_ms
from train_step import MODELS, arm_builders, import_unsloth, llama_config

BLOCK_ARMS = (
    "nolora-nf4",
    "peft-bnb-nf4",
    "unsloth-nf4",
    "fastlora-nf4",
    "fastlora-nf4-nofold",
    "fastlora-nf4-perlayer",
)


def _find(model: torch.nn.Module, suffix: str) -> torch.nn.Module:
    return next(m for m in model.modules() if type(m).__name__.endswith(suffix))


def layer_call(model: torch.nn.Module, batch: int, seq: int, device: torch.device):
    """``call()``: one forward+backward of the model's first decoder layer on fresh-looking data (the
    same random x and dy every call; a new autograd graph every call)."""
    layer, rotary = _find(model, "DecoderLayer"), _find(model, "RotaryEmbedding")
    hidden = model.config.hidden_size
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, seq, hidden, device=device, generator=gen).to(torch.bfloat16).requires_grad_(True)
    dy = torch.randn(batch, seq, hidden, device=device, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        pos = rotary(x, torch.arange(seq, device=device)[None])
    params = [p for p in layer.parameters() if p.requires_grad]

    def call():
        y = layer(x, position_embeddings=pos)
        y = y[0] if isinstance(y, tuple) else y
        return torch.autograd.grad(y, [x, *params], dy)

    return call


def _unfolded(call):
    """``call`` with the grouped ops' forward not folding the LoRA term into the base GEMM."""
    from fastlora import grouped

    def run():
        grouped.FOLD_FORWARD = False
        try:
            return call()
        finally:
            grouped.FOLD_FORWARD = True

    return run


def measure(call, reps: int, cuda: bool, cycles: float) -> dict:
    for _ in range(3):
        call()
    if not cuda:  # CPU smoke run: the wall time is the host time
        t = time.perf_counter()
        for _ in range(reps):
            call()
        return dict(host_us=(time.perf_counter() - t) / reps * 1e6, gpu_us=float("nan"), kernels=0, calls=reps)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    # CUDA's launch queue holds about a thousand kernels: queue more behind the sleep and the host
    # blocks until the GPU drains it (the measured "host time" is then the sleep). So a few calls per
    # loop (~700 kernels), and many loops, the median.
    calls = max(1, 700 // max(kernels, 1))
    torch.cuda.synchronize()
    t = time.perf_counter()
    call()
    torch.cuda.synchronize()
    one = (time.perf_counter() - t) * 1e3
    runs = [queued(call, calls, one, cycles) for _ in range(reps)]
    host = sorted(h for h, _ in runs)[reps // 2]
    gpu = sorted(g for _, g in runs)[reps // 2]
    return dict(host_us=host * 1e3, gpu_us=gpu * 1e3, kernels=kernels, calls=calls)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--arms", nargs="+", default=list(BLOCK_ARMS), choices=BLOCK_ARMS)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--reps", type=int, default=7, help="queued loops per measurement (median)")
    p.add_argument("--rounds", type=int, default=2, help="measure the arms this many times, interleaved")
    p.add_argument("--peer", type=Path, default=Path(__file__).resolve().parents[1] / ".peer",
                   help="folder holding unsloth/kernels (../shared/tools/unsloth-peer.sh)")  # fmt: skip
    p.add_argument("--json", type=Path, default=Path("block.json"))
    p.add_argument("--tiny", action="store_true", help="small layers on the CPU: checks the script, not speed")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    if not cuda and not args.tiny:
        raise SystemExit("bench/bench_block.py needs a CUDA GPU (or --tiny for a CPU smoke run)")
    device = torch.device("cuda" if cuda else "cpu")
    from transformers import LlamaForCausalLM

    unsloth = import_unsloth(args.peer) if "unsloth-nf4" in args.arms and cuda else "needs CUDA and --peer"
    if isinstance(unsloth, str) and "unsloth-nf4" in args.arms:
        print(f"unsloth arm skipped: {unsloth}", flush=True)
    cycles = sleep_cycles_per_ms() if cuda else 0.0
    out = {"gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke run)", "date": time.strftime("%Y-%m-%d %H:%M"),
           "torch": torch.__version__, "r": args.r, "alpha": args.alpha, "rows": []}  # fmt: skip
    for name in args.models:
        cfg = llama_config(name, 1, args.tiny)
        batch, seq = MODELS[name][5:] if not args.tiny else (2, 64)
        torch.manual_seed(0)
        with torch.device(device):
            base = LlamaForCausalLM(cfg).to(torch.bfloat16)
        base.requires_grad_(False)
        base_nf4 = quantize_linears(base, device)
        builders = arm_builders(types.SimpleNamespace(r=args.r, alpha=args.alpha), base_nf4, None, unsloth)
        builders["nolora-nf4"] = lambda b=base_nf4: (copy.deepcopy(b), [])
        builders["fastlora-nf4-nofold"] = builders["fastlora-nf4"]
        calls = {}
        for arm in args.arms:
            if arm in builders:
                model, _ = builders[arm]()
                model.train()
                call = layer_call(model, batch, seq, device)
                calls[arm] = (model, _unfolded(call) if arm.endswith("-nofold") else call)
        results: dict[str, list[dict]] = {arm: [] for arm in calls}
        for _ in range(args.rounds):
            for arm, (_, call) in calls.items():
                results[arm].append(measure(call, args.reps, cuda, cycles))
        for arm, rs in results.items():
            host = sorted(r["host_us"] for r in rs)
            gpu = sorted(r["gpu_us"] for r in rs)
            row = dict(model=name, tokens=batch * seq, arm=arm, host_us=host[len(host) // 2], gpu_us=gpu[len(gpu) // 2],
                       host_us_rounds=[r["host_us"] for r in rs], kernels=rs[-1]["kernels"])  # fmt: skip
            out["rows"].append(row)
            print(json.dumps(row), flush=True)
        del calls, base, base_nf4, builders
        if cuda:
            torch.cuda.empty_cache()
    args.json.write_text(json.dumps(out, indent=1))
    print(f"\n{out['gpu']}, one decoder layer forward+backward, NF4, r={args.r}; medians over {args.rounds} rounds")
    print(f"{'model':6s}{'arm':24s}{'host µs':>10s}{'gpu µs':>10s}{'kernels':>9s}{'host ÷ Unsloth':>16s}")
    for name in args.models:
        rows = [r for r in out["rows"] if r["model"] == name]
        ref = next((r["host_us"] for r in rows if r["arm"] == "unsloth-nf4"), float("nan"))
        for r in rows:
            print(
                f"{name:6s}{r['arm']:24s}{r['host_us']:10.0f}{r['gpu_us']:10.0f}{r['kernels']:9d}{r['host_us'] / ref:16.2f}"
            )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
