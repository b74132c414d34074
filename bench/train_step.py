"""Training-step benchmark: fastlora vs PEFT, NF4 and bf16, on a Llama-3-8B-shaped model cut to L layers.

Arms, all in one run and on the same weights: fastlora on NF4, PEFT + bitsandbytes on NF4 (the very
same quantised weights), fastlora on bf16, PEFT on bf16, and fastlora NF4 under ``torch.compile``.
r=16 on every linear layer of the decoder, AdamW, batch 2x2048 and 8x1024 tokens, gradient
checkpointing off and on. Reported per arm: tokens/s (median step time after warm-up, CUDA events),
peak GPU memory, and ratios to PEFT + bnb. Checks, same run: first-step logits and loss of fastlora
equal PEFT's (same A, B) within bf16 tolerance, and both reach the same loss after ``--conv-steps``
steps on a fixed set of batches.

    python bench/train_step.py                        # L=8, all arms and shapes
    python bench/train_step.py --layers 4 --shapes 2x2048 --no-checkpointing-on

Needs a CUDA GPU, bitsandbytes, transformers and peft. Prints a table; writes ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time
from pathlib import Path

import torch
from common import llama8b_config, quantize_linears, token_batches

import fastlora

GIB = 1024**3
ARMS = ("fastlora-nf4", "peft-bnb-nf4", "fastlora-bf16", "peft-bf16", "fastlora-nf4-compile", "peft-bnb-nf4-compile")


def make_batches(n: int, batch: int, seq: int, vocab: int, seed: int, device: torch.device) -> list[torch.Tensor]:
    return [b["input_ids"] for b in token_batches(n, batch, seq, vocab, seed, device)]


class Timer:
    """CUDA events on a GPU, the host clock (after the step returns) on a CPU smoke run."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def mem_allocated(peak: bool = False) -> int:
    if not torch.cuda.is_available():
        return 0
    return torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()


def patch_fastlora(model, r: int, alpha: float):
    return fastlora.patch(model, r=r, alpha=alpha)


def patch_peft(model, r: int, alpha: float):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0))


def copy_lora_weights(src_fastlora, dst_peft) -> None:
    """Give the PEFT model exactly fastlora's A and B, so that both compute the same function."""
    inner = dst_peft.base_model.model
    with torch.no_grad():
        for name, layer in fastlora.lora_layers(src_fastlora).items():
            peft_layer = inner.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)


def step_fn(model, opt):
    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def time_steps(step, batches, warmup: int, iters: int) -> list[float]:
    cuda = batches[0].is_cuda
    for i in range(warmup):
        step(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize()
    times = []
    for i in range(iters):
        with Timer(cuda) as t:
            step(batches[i % len(batches)])
        times.append(t.seconds)
    return times


def run_arm(label, build, batches, args, checkpointing: bool, compile_model: bool = False):
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_mem = mem_allocated()
    model = build()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr)
    fwd = torch.compile(model) if compile_model else model
    step = step_fn(fwd, opt)
    t0 = time.perf_counter()
    try:
        times = time_steps(step, batches, args.warmup, args.iters)
    except Exception as exc:  # report a failing arm (e.g. a compile error) and keep the others
        del model, opt, fwd, step
        return {"arm": label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    wall = time.perf_counter() - t0
    tokens = batches[0].numel()
    med = statistics.median(times)
    out = {
        "arm": label,
        "checkpointing": checkpointing,
        "step_s": med,
        "step_s_min": min(times),
        "tokens_per_s": tokens / med,
        "peak_gib": (mem_allocated(peak=True) - base_mem) / GIB,
        "wall_s": wall,
        "trainable": sum(p.numel() for p in params),
    }
    del model, opt, fwd, step
    return out


def fp32_truth(patched):
    """An fp32 copy of a fastlora-patched model: every LoRA layer becomes an ``nn.Linear`` holding
    dequant(W0) + s·B·A in fp32, everything else upcast. What both bf16 arms approximate."""
    truth = copy.deepcopy(patched)
    for name, layer in fastlora.lora_layers(patched).items():
        w = layer.dense_base_weight(torch.float32) + layer.delta_weight(torch.float32)
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=layer.base_layer.bias is not None, device=w.device)
        lin.weight.data.copy_(w)
        if lin.bias is not None:
            lin.bias.data.copy_(layer.base_layer.bias.float())
        truth.set_submodule(name, lin)
    return truth.float()


def agreement(base_nf4, batches, args) -> dict:
    """First-step logits/loss and 50-step losses of fastlora vs PEFT on NF4, same A and B."""
    ours = patch_fastlora(copy.deepcopy(base_nf4), args.r, args.alpha)
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in fastlora.lora_layers(ours).values():
            layer.lora_B.normal_(0, 1e-3)
    theirs = patch_peft(copy.deepcopy(base_nf4), args.r, args.alpha)
    copy_lora_weights(ours, theirs)
    ids = batches[0]
    with torch.no_grad():
        lo, lt = ours(input_ids=ids, labels=ids), theirs(input_ids=ids, labels=ids)
        truth = fp32_truth(ours)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
        try:
            ref = truth(input_ids=ids, labels=ids)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        del truth

    def relerr(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    res = {
        "first_logits_relerr": relerr(lo.logits, lt.logits),
        "fastlora_logits_relerr_vs_fp32": relerr(lo.logits, ref.logits),
        "peft_logits_relerr_vs_fp32": relerr(lt.logits, ref.logits),
        "first_loss_fastlora": lo.loss.item(),
        "first_loss_peft": lt.loss.item(),
        "first_loss_fp32": ref.loss.item(),
    }
    del lo, lt, ref
    curves = {}
    for name, model in (("fastlora", ours), ("peft", theirs)):
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        step = step_fn(model, opt)
        curves[name] = [step(batches[i % len(batches)]).item() for i in range(args.conv_steps)]
        del opt, step
    res["curves"] = curves
    res["final_loss_fastlora"] = statistics.fmean(curves["fastlora"][-5:])
    res["final_loss_peft"] = statistics.fmean(curves["peft"][-5:])
    del ours, theirs
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--model", choices=["8b", "3b"], default="8b", help="3b: hidden 3072, MLP 8192, 24/8 heads")
    p.add_argument("--shapes", nargs="+", default=["2x2048", "8x1024"])
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--conv-steps", type=int, default=50)
    p.add_argument("--no-checkpointing-on", action="store_true", help="skip the gradient-checkpointing runs")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--arms", nargs="+", default=None, choices=ARMS, help="run only these arms (default: all)")
    p.add_argument("--no-agreement", action="store_true", help="skip the first-step / 50-step agreement check")
    p.add_argument("--json", type=Path, default=Path("train_step.json"))
    p.add_argument("--tiny", action="store_true", help="a small model on the CPU: checks the script, not speed")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        raise SystemExit("bench/train_step.py needs a CUDA GPU (or --tiny for a CPU smoke run)")
    from transformers import LlamaForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = llama8b_config(args.layers, tiny=args.tiny)
    if args.model == "3b" and not args.tiny:
        cfg.update(dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8))
    with torch.device(device):
        base_bf16 = LlamaForCausalLM(cfg).to(torch.bfloat16)
    base_bf16.requires_grad_(False)
    base_nf4 = quantize_linears(copy.deepcopy(base_bf16), device)  # one quantisation, shared by both NF4 arms
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke run)"
    results = {"gpu": gpu, "date": time.strftime("%Y-%m-%d %H:%M"),
               "torch": torch.__version__, "layers": args.layers, "r": args.r, "runs": []}  # fmt: skip
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        pass

    for shape in args.shapes:
        b, s = (int(v) for v in shape.split("x"))
        batches = make_batches(4, b, s, cfg.vocab_size, seed=1, device=device)
        for ckpt in [False] + ([] if args.no_checkpointing_on else [True]):
            arms = [
                ("fastlora-nf4", lambda: patch_fastlora(copy.deepcopy(base_nf4), args.r, args.alpha)),
                ("peft-bnb-nf4", lambda: patch_peft(copy.deepcopy(base_nf4), args.r, args.alpha)),
                ("fastlora-bf16", lambda: patch_fastlora(copy.deepcopy(base_bf16), args.r, args.alpha)),
                ("peft-bf16", lambda: patch_peft(copy.deepcopy(base_bf16), args.r, args.alpha)),
            ]
            for label, build in arms:
                if args.arms and label not in args.arms:
                    continue
                r = run_arm(label, build, batches, args, ckpt)
                r["shape"] = shape
                results["runs"].append(r)
                print(json.dumps(r), flush=True)
                args.json.write_text(json.dumps(results, indent=1))  # a run cut short keeps its arms
            for label, build in (("fastlora-nf4-compile", arms[0][1]), ("peft-bnb-nf4-compile", arms[1][1])):
                if args.no_compile or (args.arms and label not in args.arms):
                    continue
                r = run_arm(label, build, batches, args, ckpt, compile_model=True)
                r["shape"] = shape
                results["runs"].append(r)
                print(json.dumps(r), flush=True)
                args.json.write_text(json.dumps(results, indent=1))
    if args.no_agreement:
        args.json.write_text(json.dumps(results, indent=1))
        return print_table(results, args)
    agree_batches = make_batches(4, 2, 1024 if not args.tiny else 64, cfg.vocab_size, seed=2, device=device)
    results["agreement"] = agreement(base_nf4, agree_batches, args)
    args.json.write_text(json.dumps(results, indent=1))
    return print_table(results, args)


def print_table(results: dict, args) -> int:
    print(f"\n{results['gpu']}, {args.layers} layers of Llama-3-8B shape, r={args.r}, AdamW")
    print(
        f"{'shape':8s} {'ckpt':5s} {'arm':22s} {'tok/s':>9s} {'peak GiB':>9s} {'tok/s ÷ peft-bnb':>17s} {'mem ÷ peft-bnb':>15s}"
    )
    for shape in args.shapes:
        for ckpt in (False, True):
            rows = [r for r in results["runs"] if r["shape"] == shape and r.get("checkpointing", ckpt) == ckpt]
            ref = next((r for r in rows if r["arm"] == "peft-bnb-nf4" and "error" not in r), None)
            for r in rows:
                if "error" in r:
                    print(f"{shape:8s} {ckpt!s:5s} {r['arm']:22s} failed: {r['error'][:80]}")
                    continue
                tr = r["tokens_per_s"] / ref["tokens_per_s"] if ref else float("nan")
                mr = r["peak_gib"] / ref["peak_gib"] if ref and ref["peak_gib"] else float("nan")
                print(
                    f"{shape:8s} {ckpt!s:5s} {r['arm']:22s} {r['tokens_per_s']:9.0f} {r['peak_gib']:9.2f} {tr:17.2f} {mr:15.2f}"
                )
    a = results.get("agreement")
    if a is None:
        print(f"wrote {args.json}")
        return 0
    print(f"\nfirst step (NF4, same A/B): logits relerr fastlora vs PEFT {a['first_logits_relerr']:.2e}; "
          f"vs an fp32 model of the same weights: fastlora {a['fastlora_logits_relerr_vs_fp32']:.2e}, "
          f"PEFT {a['peft_logits_relerr_vs_fp32']:.2e}; loss {a['first_loss_fastlora']:.4f} (fastlora) "
          f"vs {a['first_loss_peft']:.4f} (PEFT) vs {a['first_loss_fp32']:.4f} (fp32)")  # fmt: skip
    print(
        f"after {args.conv_steps} steps: loss {a['final_loss_fastlora']:.4f} (fastlora) vs {a['final_loss_peft']:.4f} (PEFT)"
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
