"""Sketched vs exact LoRA-GA on a Llama-3-8B-shaped NF4 model: peak GPU memory, time, alignment (GPU).

One NF4 model (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 128256; ``--layers``
decoder layers, 32 by default) is built once; every arm patches it, runs, and unpatches it, so only
one copy of the weights is ever on the GPU. Batches of ``--batch`` x ``--seq`` random tokens, r=16 on
every decoder linear.

* ``qlora-step``: QLoRA training steps (NF4, r=16, AdamW): the yardstick for peak memory and time.
* ``sketch``: ``fastlora.estimate_gradient(model, data, sketch="auto")`` (k = 4r = 64, l = 129, one
  pass, nothing offloaded); per-batch time from runs over 1 and ``--iters`` batches (the difference)
  and the fixed cost (the reconstruction), peak memory; then the SVD+init from its factors.
* ``sketch-2pass``: the same with ``passes=2``.
* ``sketch-auto``: the same with the default ``passes="auto"`` (the first pass's error estimate,
  then projection passes until the top-2r energy settles, at most ``max_passes=4``): passes taken,
  the energy's relative rise per pass, and the time per batch and pass.
* ``exact-cpu``: the dense estimate with fp32 accumulators in host memory (``offload="cpu"``, the
  only way the 32-layer 8B model's 28 GiB of fp32 gradients fit), then the SVD+init from them
  (randomized SVD, q = 4r, 4 power iterations, as the reference).
* ``alignment``: the first-step alignment (closed form, see bench/sketch_accuracy.py) of the
  sketched and the exact init against the exact averaged gradient of the same batches.

Before that, a correctness check of the CUDA sketch path (bf16 activations, mm with fp32 output and
the hi/lo split): a full-width sketch of a small bf16 model reproduces its dense estimate.

    python bench/bench_sketch.py --json $OUT/sketch.json            # on a GPU
    python bench/bench_sketch.py --arms sketch,sketch-2pass,sketch-auto,exact-cpu   # the alignment arms only
    python bench/bench_sketch.py --tiny                             # CPU smoke run of the script (seconds)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from common import GIB, fresh, llama8b_config, peak_gib, quantize_linears, sync, token_batches

import fastlora
from fastlora.lora_ga import auto_sketch_size

ARMS = ("qlora-step", "sketch", "sketch-2pass", "sketch-auto", "exact-cpu")


def clock(device: torch.device, fn):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def gpu_check(device: torch.device) -> dict:
    """A full-width sketch on CUDA with bf16 activations reproduces the dense estimate (1, 2 and 3 passes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    model = LlamaForCausalLM(cfg).to(device, torch.bfloat16).eval()
    data = token_batches(3, 2, 128, 512, seed=1, device=device)
    dense = fastlora.estimate_gradient(model, data, progress=False)
    out = {}
    for passes in (1, 2, 3):  # 3: the left-side projection pass (Qᵀ·G) on CUDA too
        sk = fastlora.estimate_gradient(model, data, progress=False, sketch=256, passes=passes)
        worst = max(float((sk[n].dense() - dense[n]).norm() / dense[n].norm()) for n in dense)
        out[f"full_width_relerr_passes{passes}"] = worst
    return out


def lora_factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {n: (lay.lora_A.detach().float().cpu(), lay.lora_B.detach().float().cpu())
            for n, lay in fastlora.lora_layers(model).items()}  # fmt: skip


@torch.no_grad()
def alignment(factors: dict, grads, device: torch.device) -> tuple[float, float]:
    """(all-layer cosine, worst layer's cosine) of −lr·s²·(B·Bᵀ·G + G·Aᵀ·A) with −G."""
    dot = nd = ng = 0.0
    worst = 1.0
    for name, (A, B) in factors.items():
        G = grads[name].to(device, torch.float32)
        A, B = A.to(device), B.to(device)
        d = B @ (B.t() @ G) + (G @ A.t()) @ A
        dd, dn, gn = float((d * G).sum()), float(d.norm() ** 2), float(G.norm() ** 2)
        dot, nd, ng = dot + dd, nd + dn, ng + gn
        worst = min(worst, dd / max((dn * gn) ** 0.5, 1e-300))
    return dot / max((nd * ng) ** 0.5, 1e-300), worst


def run(args) -> dict:
    from transformers import LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    res: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke run)",
        "torch": torch.__version__,
        "layers": args.layers,
        "tokens_per_batch": args.batch * args.seq,
        "r": args.r,
        "sketch_k": auto_sketch_size(args.r),
        "iters": args.iters,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "arms": {},
    }
    out_json = args.json

    def save() -> None:
        out_json.write_text(json.dumps(res, indent=1))

    if device.type == "cuda":
        res["gpu_check"] = gpu_check(device)
        print("gpu check", json.dumps(res["gpu_check"]), flush=True)
        fresh(device)

    cfg = llama8b_config(args.layers, tiny=args.tiny)
    torch.manual_seed(0)
    t_build = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = quantize_linears(model, device).eval()
    model.requires_grad_(False)
    res["build_s"] = time.perf_counter() - t_build
    data = token_batches(1 + args.iters, args.batch, args.seq, cfg.vocab_size, seed=1, device=device)
    warm, timed = data[:1], data[1:]
    r, alpha = args.r, 2 * args.r
    base_mem = fresh(device)
    res["model_gib"] = base_mem / GIB

    def arm(label: str, fn) -> None:
        fresh(device)
        try:
            res["arms"][label] = fn()
        except Exception as exc:  # keep the other arms
            res["arms"][label] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        finally:
            if fastlora.lora_layers(model):
                fastlora.unpatch(model)
        print(label, json.dumps(res["arms"][label]), flush=True)
        save()

    def qlora() -> dict:
        fastlora.patch(model, r=r, alpha=alpha)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def steps(batches):
            for b in batches:
                model(**b).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        steps(warm)
        fresh(device)
        sec, _ = clock(device, lambda: steps(timed))
        model.eval()
        return {"s_per_step": sec / len(timed), "peak_gib": peak_gib(device)}

    if "qlora-step" in args.arms:
        arm("qlora-step", qlora)

    factors: dict[str, dict] = {}  # the init's (A, B) per arm, for the alignment at the end

    def sketch(passes: int | str) -> dict:
        fastlora.patch(model, r=r, alpha=alpha)
        est = lambda d: fastlora.estimate_gradient(model, d, sketch="auto", passes=passes, progress=False)  # noqa: E731
        est(warm)
        fresh(device)
        t1, sk1 = clock(device, lambda: est(timed[:1]))
        peak1 = peak_gib(device)
        fresh(device)
        tn, sk = clock(device, lambda: est(timed))
        peak = max(peak1, peak_gib(device))
        if sk1.passes == sk.passes:  # per batch and pass: the difference of the two runs
            per_batch = (tn - t1) / max(len(timed) - 1, 1) / sk.passes
            fixed = t1 - per_batch * sk.passes
        else:  # "auto" took a different number of passes on one batch: the fixed cost is not separable
            per_batch, fixed = tn / (len(timed) * sk.passes), float("nan")
        fastlora.unpatch(model)
        fresh(device)
        t_init, _ = clock(
            device, lambda: fastlora.patch(model, method="lora_ga", r=r, alpha=alpha, grads=sk, progress=False)
        )
        factors[f"sketch-{passes}"] = lora_factors(model)
        sketch_gib = sum((f.U.numel() + f.Vh.numel()) * 4 for f in sk.values()) / GIB
        return {
            "passes_taken": sk.passes,
            "passes_taken_one_batch": sk1.passes,
            "energy_changes": [(b - a) / b for a, b in zip(sk.energies, sk.energies[1:])],
            "predicted_alignments": sk.alignments,
            "error_max": max(sk.errors.values()) if sk.errors else None,
            "s_per_batch": per_batch,  # per pass over one batch
            "s_fixed_reconstruction": fixed,
            "s_total": tn,
            "s_init_from_factors": t_init,
            "peak_gib": peak,
            "factors_gib": sketch_gib,
            "sizes_example": next(iter(sk.sizes.values())),
        }

    for label, passes in (("sketch", 1), ("sketch-2pass", 2), ("sketch-auto", "auto")):
        if label in args.arms:
            arm(label, lambda passes=passes: sketch(passes))

    exact_est: dict = {}

    def exact() -> dict:
        fastlora.patch(model, r=r, alpha=alpha)
        fresh(device)
        sec, est = clock(device, lambda: fastlora.estimate_gradient(model, timed, offload="cpu", progress=False))
        peak = peak_gib(device)
        exact_est["g"] = est
        fastlora.unpatch(model)
        fresh(device)
        t_init, _ = clock(
            device, lambda: fastlora.patch(model, method="lora_ga", r=r, alpha=alpha, grads=est, progress=False)
        )
        init_peak = peak_gib(device)
        factors["exact"] = lora_factors(model)
        return {
            "s_per_batch": sec / len(timed),
            "s_total": sec,
            "s_init_from_G": t_init,
            "peak_gib": peak,
            "init_peak_gib": init_peak,
            "host_gib": sum(g.numel() * 4 for g in est.values()) / GIB,
        }

    if "exact-cpu" in args.arms:
        arm("exact-cpu", exact)

    if args.profile:
        res["profile"] = str(profile(model, warm, timed[:1], r, alpha, args.profile))

    if "g" in exact_est:
        al = {}
        for label, f in factors.items():
            cos, worst = alignment(f, exact_est["g"], device)
            al[label] = {"cos": cos, "worst_layer_cos": worst}
        res["alignment"] = al
        print("alignment", json.dumps(al), flush=True)
    save()
    return res


def profile(model, warm: list[dict], batch: list[dict], r: int, alpha: float, path: Path) -> Path:
    """Kernel-level profile of one QLoRA step and one sketched batch (``torch.profiler``): where the
    sketched pass spends the time a training step does not. Writes the two top-25 tables to ``path``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    tables = []
    fastlora.patch(model, r=r, alpha=alpha)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(b: dict) -> None:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(warm[0])
    with torch_profile(activities=acts) as prof:
        step(batch[0])
        sync(batch[0]["input_ids"].device)
    tables.append(("one QLoRA step", prof))
    model.eval()
    opt.zero_grad(set_to_none=True)
    fastlora.estimate_gradient(model, warm, sketch="auto", passes=1, progress=False)
    with torch_profile(activities=acts) as prof:
        fastlora.estimate_gradient(model, batch, sketch="auto", passes=1, progress=False)
        sync(batch[0]["input_ids"].device)
    tables.append(("one sketched batch (estimate_gradient, sketch='auto', reconstruction included)", prof))
    fastlora.unpatch(model)
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    text = "\n\n".join(f"## {title}\n{prof.key_averages().table(sort_by=key, row_limit=25)}" for title, prof in tables)
    path.write_text(text)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--iters", type=int, default=3, help="timed batches per arm (plus one warm-up)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--no-exact", action="store_true", help="leave out exact-cpu (and so the alignment)")
    p.add_argument("--no-two-pass", action="store_true", help="leave out sketch-2pass")
    p.add_argument("--json", type=Path, default=Path("sketch.json"))
    p.add_argument("--profile", type=Path, default=None, help="also write a torch.profiler table to this file")
    p.add_argument("--tiny", action="store_true", help="a small model on the CPU: checks the script, not speed")
    args = p.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(args.arms) - set(ARMS))
    if unknown:
        p.error(f"unknown arm(s) {unknown}; choose from {ARMS}")
    dropped = {"exact-cpu"} if args.no_exact else set()
    dropped |= {"sketch-2pass"} if args.no_two_pass else set()
    args.arms = [a for a in args.arms if a not in dropped]
    if args.tiny:
        args.seq, args.r, args.layers = min(args.seq, 64), min(args.r, 8), min(args.layers, 2)
    elif not torch.cuda.is_available():
        raise SystemExit("bench/bench_sketch.py needs a CUDA GPU (or --tiny for a CPU smoke run)")
    res = run(args)
    arms = res["arms"]
    q = arms.get("qlora-step", {})
    print(f"\n{res['device']}: {res['layers']} layers of the Llama-3-8B shape in NF4, {res['tokens_per_batch']} "
          f"tokens/batch, r={res['r']}, sketch k={res['sketch_k']}")  # fmt: skip
    print(
        f"{'arm':14s} {'passes':>6s} {'s/batch':>9s} {'fixed s':>8s} {'init s':>7s} {'peak GiB':>9s} {'mem ÷ qlora':>12s}"
    )
    for label, a in arms.items():
        if "error" in a:
            print(f"{label:14s} failed: {a['error'][:100]}")
            continue
        sb = a.get("s_per_batch", a.get("s_per_step", float("nan")))
        fixed = a.get("s_fixed_reconstruction", float("nan"))
        init = a.get("s_init_from_factors", a.get("s_init_from_G", float("nan")))
        mr = a["peak_gib"] / q["peak_gib"] if q.get("peak_gib") else float("nan")
        taken = a.get("passes_taken", "")
        print(f"{label:14s} {taken:>6} {sb:9.3f} {fixed:8.2f} {init:7.2f} {a['peak_gib']:9.2f} {mr:12.3f}")
    al = res.get("alignment", {})
    for label, a in al.items():
        delta = f", Δ vs exact {a['cos'] - al['exact']['cos']:+.4f}" if "exact" in al and label != "exact" else ""
        print(f"alignment {label:12s}: all layers {a['cos']:.4f}{delta}, worst layer {a['worst_layer_cos']:.4f}")
    auto = arms.get("sketch-auto", {})
    if "passes_taken" in auto:
        changes = ", ".join(f"{c:.2%}" for c in auto["energy_changes"])
        pred = ", ".join(f"{c:.4f}" for c in auto["predicted_alignments"])
        print(f"sketch-auto: {auto['passes_taken']} passes (first-pass error estimate max {auto['error_max']:.2f}; "
              f"predicted alignment per pass from the 2nd: {pred or '-'}; top-2r energy rise per pass from the "
              f"3rd: {changes or '-'})")  # fmt: skip
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
