"""LoRA-GA benchmark: gradient estimation memory/time, and SVD+init time, on a Llama-3-8B-shaped model.

Arms (each on a fresh copy of the same weights, alone on the GPU, batch ``--batch`` x ``--seq`` tokens):

* ``reference-bf16``: the reference way -- a bf16 model, ``requires_grad`` on every decoder linear
  weight, ``loss.backward()``, ``.grad`` added into fp32 sums on the GPU, ``.grad`` freed.
* ``ours-bf16`` / ``ours-bf16-cpu`` / ``ours-bf16-blocks``: ``fastlora.estimate_gradient`` on the
  patched bf16 model with no offload, pinned-host accumulators, and block offload (the model starts
  in host memory; only embeddings/head and <= 3 decoder blocks are on the GPU at a time).
* ``ours-nf4`` / ``ours-nf4-cpu``: the same on the NF4 model (bnb storage, fastlora's op).
* ``qlora-step``: one QLoRA training step (NF4, r=16, AdamW) on the same batch: the yardstick.

Also checked in the same run (CUDA paths the CPU tests cannot reach): the cpu and block-offload
estimates against the no-offload one (relative error), and the NF4 estimate against bf16's.
Then the SVD+init time: ``lora_ga_factors`` + the fp32 offset for every linear layer of the full
32-layer 8B shape (randomized SVD as the reference: q = 4r, 4 power iterations), and one exact SVD
per distinct shape for comparison.

    python bench/bench_lora_ga.py --json $OUT/lora_ga.json     # on a GPU
    python bench/bench_lora_ga.py --tiny                        # CPU smoke run of the script
"""

from __future__ import annotations

import argparse
import copy
import json
import threading
import time
from pathlib import Path

import torch
from common import fresh, llama8b_config, peak_gib, quantize_linears, sync, token_batches

import fastlora
from fastlora.lora_ga import DenseAccumulator, HostAccumulator, lora_ga_factors


def decoder_linears(model) -> dict[str, torch.nn.Module]:
    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}


def reference_estimate(model, data, device) -> dict[str, torch.Tensor]:
    """The reference way: autograd .grad of every linear weight, summed in fp32 on the GPU."""
    lin = decoder_linears(model)
    for m in lin.values():
        m.weight.requires_grad_(True)
    sums = {n: torch.zeros(m.weight.shape, dtype=torch.float32, device=device) for n, m in lin.items()}
    for batch in data:
        b = {k: v.to(device) for k, v in batch.items()}
        model(**b).loss.backward()
        for n, m in lin.items():
            sums[n].add_(m.weight.grad)
            m.weight.grad = None
    for m in lin.values():
        m.weight.requires_grad_(False)
    return {n: s / len(data) for n, s in sums.items()}


def timed(fn, device, data):
    """Seconds per batch in steady state, and the fixed cost per call (accumulator set-up, pinning).

    ``fn(data[:1])`` warms up; then ``t1 = T(fn(data[:1]))`` and ``tn = T(fn(data))``: per batch is
    ``(tn − t1) / (len(data) − 1)``, set-up ``t1 − per batch``. Returns the last call's output.
    """
    fn(data[:1])
    times, out = [], None
    for part in (data[:1], data):
        out = None  # the previous call's estimate must not stay on the GPU during this one
        sync(device)
        t0 = time.perf_counter()
        out = fn(part)
        sync(device)
        times.append(time.perf_counter() - t0)
    per_batch = (times[1] - times[0]) / (len(data) - 1)
    return per_batch, times[0] - per_batch, out


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def worst_relerr(est, ref) -> float:
    return max(relerr(est[n], ref[n]) for n in ref)


def host_microbench(device: torch.device) -> dict:
    """D2H bandwidth into pinned memory and host fp32 add bandwidth, on a 14336x4096 partial."""
    if device.type != "cuda":
        return {}
    n = 14336 * 4096
    src = torch.randn(n, device=device)
    pinned = torch.empty(n, pin_memory=True)
    acc = torch.randn(n)
    out = {}
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        pinned.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        out["d2h_GBps"] = 4 * n / (time.perf_counter() - t0) / 1e9
    for label in ("add_main_thread_GBps", "add_worker_thread_GBps"):

        def add(label=label):
            t0 = time.perf_counter()
            acc.add_(pinned)
            out[label] = 3 * 4 * n / (time.perf_counter() - t0) / 1e9  # read 2, write 1

        for _ in range(2):
            if "worker" in label:
                th = threading.Thread(target=add)
                th.start()
                th.join()
            else:
                add()
    out["torch_threads"] = torch.get_num_threads()
    return out


def run(args) -> dict:
    from transformers import LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    cfg = llama8b_config(args.layers, tiny=args.tiny)
    torch.manual_seed(0)
    with torch.device(device):
        master = LlamaForCausalLM(cfg).to(torch.bfloat16)
    master = master.cpu().eval()  # the master copy lives in host memory; each arm copies it
    master.requires_grad_(False)
    data = token_batches(1 + args.iters, args.batch, args.seq, cfg.vocab_size, seed=1)
    res: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke run)",
        "torch": torch.__version__,
        "layers": args.layers,
        "tokens_per_batch": args.batch * args.seq,
        "r": args.r,
        "arms": {},
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    res["host"] = host_microbench(device)
    print("host", json.dumps(res["host"]), flush=True)
    est: dict[str, dict] = {}

    def arm(label: str, build, work, repeat: bool = False) -> None:
        base = fresh(device)
        try:
            model = build()
            sec, setup, out = timed(lambda d: work(model, d), device, data)
            res["arms"][label] = {"s_per_batch": sec, "setup_s": setup, "peak_gib": peak_gib(device, base)}
            if out is not None:
                est[label] = {k: out[k].float().cpu() for k in out}
                if repeat:  # the same call again: the run-to-run noise of the bf16 backward
                    again = work(model, data)
                    res["arms"][label]["repeat_worst_relerr"] = worst_relerr(
                        {k: again[k].float().cpu() for k in again}, est[label]
                    )
        except Exception as exc:  # keep the other arms
            res["arms"][label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(label, json.dumps(res["arms"][label]), flush=True)
        model = None
        fresh(device)

    def patched(dtype_model):
        return fastlora.patch(dtype_model, r=args.r, alpha=2 * args.r)

    def on_device(m):
        return m.to(device)

    def shapes(model):
        return {n: (m.out_features, m.in_features) for n, m in fastlora.lora_layers(model).items()}

    def ours(offload, accumulator=None):
        def work(model, d):
            acc = accumulator(model) if accumulator is not None else None
            return fastlora.estimate_gradient(model, d, iters=len(d), offload=offload, accumulator=acc, progress=False)

        return work

    arm("reference-bf16", lambda: on_device(copy.deepcopy(master)), lambda m, d: reference_estimate(m, d, device))
    arm("ours-bf16", lambda: patched(on_device(copy.deepcopy(master))), ours(None), repeat=True)
    arm("ours-bf16-cpu", lambda: patched(on_device(copy.deepcopy(master))), ours("cpu"))
    arm("ours-bf16-blocks", lambda: patched(copy.deepcopy(master)), ours("blocks"))
    if device.type == "cuda":  # the offload schedule alone: block offload with the sums on the GPU
        arm(
            "ours-bf16-blocks-gpuacc",
            lambda: patched(copy.deepcopy(master)),
            ours("blocks", lambda m: DenseAccumulator(shapes(m), device)),
        )

    def nf4():
        m = quantize_linears(copy.deepcopy(master), device)
        return patched(on_device(m))

    arm("ours-nf4", nf4, ours(None))
    arm("ours-nf4-cpu", nf4, ours("cpu"))
    arm("ours-nf4-cpu-4workers", nf4, ours(None, lambda m: HostAccumulator(shapes(m), workers=4)))  # host sums

    def qlora_steps(model, d):
        model.train()
        opt = getattr(model, "_bench_opt", None)
        if opt is None:
            opt = model._bench_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for batch in d:
            b = {k: v.to(device) for k, v in batch.items()}
            model(**b).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return None

    arm("qlora-step", nf4, qlora_steps)

    # agreement on the same batches and weights: offloaded vs not, ours vs the reference
    checks = {}
    for ref_label, others in (
        ("ours-bf16", ("ours-bf16-cpu", "ours-bf16-blocks", "ours-bf16-blocks-gpuacc", "reference-bf16")),
        ("ours-nf4", ("ours-nf4-cpu", "ours-nf4-cpu-4workers")),
    ):
        for other in others:
            if ref_label in est and other in est:
                checks[f"{other} vs {ref_label}"] = worst_relerr(est[other], est[ref_label])
    res["agreement_worst_relerr"] = checks
    print("agreement", json.dumps(checks), flush=True)

    # SVD + init of every layer of the full 8B shape (32 layers), randomized as the reference
    init_dev = device
    cfg32 = llama8b_config(32, tiny=args.tiny)
    h, i_ = cfg32.hidden_size, cfg32.intermediate_size
    kv = cfg32.num_key_value_heads * (h // cfg32.num_attention_heads)
    layer_shapes = {
        "q": (h, h),
        "k": (kv, h),
        "v": (kv, h),
        "o": (h, h),
        "gate": (i_, h),
        "up": (i_, h),
        "down": (h, i_),
    }
    gen = torch.Generator(device=init_dev).manual_seed(0)
    Gs = {k: torch.randn(s, device=init_dev, generator=gen) for k, s in layer_shapes.items()}
    Ws = {k: torch.randn(s, device=init_dev, generator=gen, dtype=torch.bfloat16) for k, s in layer_shapes.items()}
    s = 2.0
    lora_ga_factors(Gs["q"], args.r, scaling=s, generator=gen)  # warm-up
    sync(init_dev)
    t0 = time.perf_counter()
    for _layer in range(cfg32.num_hidden_layers):
        for k in layer_shapes:
            A, B = lora_ga_factors(Gs[k], args.r, scaling=s, svd="randomized", generator=gen)
            w = Ws[k]
            w.copy_((w.float() - s * (B @ A)).to(w.dtype))  # the in-place offset, as the init does
    sync(init_dev)
    res["init_all_layers_8b_s"] = time.perf_counter() - t0
    exact = {}
    for k in ("q", "gate"):
        sync(init_dev)
        t0 = time.perf_counter()
        lora_ga_factors(Gs[k], args.r, scaling=s, svd="exact")
        sync(init_dev)
        exact[k] = time.perf_counter() - t0
    res["exact_svd_one_layer_s"] = exact
    n_layers = cfg32.num_hidden_layers
    res["exact_svd_all_layers_8b_s_estimate"] = n_layers * (4 * exact["q"] + 3 * exact["gate"])  # k,v < q
    print("init", res["init_all_layers_8b_s"], "exact", json.dumps(exact), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--iters", type=int, default=6, help="timed batches (after one warm-up batch)")
    p.add_argument("--json", type=Path, default=Path("lora_ga.json"))
    p.add_argument("--tiny", action="store_true", help="a small model on the CPU: checks the script, not speed")
    args = p.parse_args(argv)
    if args.tiny:
        args.seq, args.r = min(args.seq, 64), min(args.r, 8)
    elif not torch.cuda.is_available():
        raise SystemExit("bench/bench_lora_ga.py needs a CUDA GPU (or --tiny for a CPU smoke run)")
    res = run(args)
    args.json.write_text(json.dumps(res, indent=1))
    arms = res["arms"]
    q = arms.get("qlora-step", {})
    print(
        f"\n{res['device']}: {args.layers} layers of Llama-3-8B shape, {res['tokens_per_batch']} tokens/batch, r={args.r}"
    )
    print(f"{'arm':24s} {'s/batch':>9s} {'setup s':>8s} {'peak GiB':>9s} {'t ÷ qlora':>10s} {'mem ÷ qlora':>12s}")
    for label, a in arms.items():
        if "error" in a:
            print(f"{label:24s} failed: {a['error'][:90]}")
            continue
        tr = a["s_per_batch"] / q["s_per_batch"] if q.get("s_per_batch") else float("nan")
        mr = a["peak_gib"] / q["peak_gib"] if q.get("peak_gib") else float("nan")
        print(f"{label:24s} {a['s_per_batch']:9.3f} {a['setup_s']:8.2f} {a['peak_gib']:9.2f} {tr:10.2f} {mr:12.2f}")
    for k, v in res["agreement_worst_relerr"].items():
        print(f"agreement {k}: worst layer relerr {v:.2e}")
    print(f"SVD+init, all {32} layers x 7 linears of the 8B shape (randomized): {res['init_all_layers_8b_s']:.2f} s; "
          f"exact SVD would take ~{res['exact_svd_all_layers_8b_s_estimate']:.0f} s")  # fmt: skip
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
