"""Convergence study: full fine-tuning vs LoRA vs LoRA-GA on a task we generate ourselves.

The shape of LoRA-GA's Figure 1 (arXiv 2407.05000), on a small scale that runs on a CPU:

1. *Pretrain* a small Llama from scratch on 2-digit addition, ``"47+85=" -> "231"`` (the sum's
   digits least-significant first, which a small transformer learns far more easily).
2. *Fine-tune* it on a related but different task, 2-digit subtraction ``"85-47=" -> "830"``
   (same format; operands ordered so the result is >= 0), with full fine-tuning, LoRA and LoRA-GA at
   the same rank. Each method's learning rate is swept over a small grid; for each, the lr with the
   lowest mean held-out loss at the last step is reported, over several seeds.

Reported: loss vs step (PNG), held-out loss at fixed steps, and held-out exact-match accuracy
(every answer digit right; the greedy decode equals the teacher-forced argmax when all digits are
right, so this is the exact-match of greedy decoding).

Usage::

    python bench/convergence.py                       # the defaults used for the README (2 CPU cores, ~15 min)
    python bench/convergence.py --quick               # a smoke run (~1 min)
    python bench/convergence.py --device cuda         # same study on a GPU

Writes ``bench/results/convergence.json`` and ``bench/results/convergence.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch

import fastlora

VOCAB = [*"0123456789+-=", "<pad>"]
TOK = {c: i for i, c in enumerate(VOCAB)}
N_DIGITS = 2
PROMPT_LEN = 2 * N_DIGITS + 2  # "abc+def="
ANSWER_LEN = N_DIGITS + 1


def make_batch(op: str, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` examples of ``op`` ("+" or "-") as token ids and labels (loss on the answer only)."""
    hi = 10**N_DIGITS
    a = torch.randint(0, hi, (n,), generator=gen)
    b = torch.randint(0, hi, (n,), generator=gen)
    if op == "-":
        a, b = torch.maximum(a, b), torch.minimum(a, b)
        c = a - b
    else:
        c = a + b
    rows = []
    for ai, bi, ci in zip(a.tolist(), b.tolist(), c.tolist()):
        text = f"{ai:0{N_DIGITS}d}{op}{bi:0{N_DIGITS}d}=" + f"{ci:0{ANSWER_LEN}d}"[::-1]
        rows.append([TOK[ch] for ch in text])
    ids = torch.tensor(rows)
    labels = ids.clone()
    labels[:, :PROMPT_LEN] = -100
    return {"input_ids": ids, "labels": labels}


def build_model(seed: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


@torch.no_grad()
def evaluate(model, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(held-out loss, exact-match accuracy) on ``batch``."""
    model.eval()
    out = model(**batch)
    logits = out.logits[:, PROMPT_LEN - 1 : -1]
    pred = logits.argmax(-1)
    exact = (pred == batch["input_ids"][:, PROMPT_LEN:]).all(dim=1).float().mean().item()
    model.train()
    return out.loss.item(), exact


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def train(model, op: str, steps: int, lr: float, batch_size: int, seed: int, eval_batch, eval_every: int, device):
    gen = torch.Generator().manual_seed(10_000 + seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 20)))
    curve = []
    model.train()
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            loss, acc = evaluate(model, eval_batch)
            curve.append({"step": step, "loss": loss, "exact_match": acc})
            if not math.isfinite(loss):
                break
        if step == steps:
            break
        loss = model(**to_device(make_batch(op, batch_size, gen), device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    return curve


def pretrain(args, device):
    model = build_model(0, args.hidden, args.layers).to(device)
    eval_batch = to_device(make_batch("+", 1024, torch.Generator().manual_seed(1)), device)
    t0 = time.perf_counter()
    curve = train(
        model, "+", args.pretrain_steps, args.pretrain_lr, args.batch, 0, eval_batch, args.pretrain_steps // 6, device
    )
    print(f"pretrain (addition): {curve[-1]} in {time.perf_counter() - t0:.0f} s", flush=True)
    return model, curve


def finetune_arm(base, method: str, lr: float, seed: int, args, eval_batch, device):
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method == "lora":
        fastlora.patch(model, r=args.r, alpha=args.alpha, use_rslora=True)
    elif method == "lora_ga":
        gen = torch.Generator().manual_seed(20_000 + seed)
        calib = [to_device(make_batch("-", args.batch, gen), device) for _ in range(args.ga_batches)]
        fastlora.patch(model, method="lora_ga", r=args.r, alpha=args.alpha, use_rslora=True, data=calib,
                       iters=args.ga_batches, progress=False, seed=seed)  # fmt: skip
    else:
        raise ValueError(method)
    return train(model, "-", args.steps, lr, args.batch, seed, eval_batch, args.eval_every, device)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--pretrain-steps", type=int, default=3000)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--ga-batches", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lrs-full", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--lrs-lora", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2])
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.steps, args.seeds, args.eval_every = 200, 30, 1, 10
        args.lrs_full, args.lrs_lora = args.lrs_full[1:2], args.lrs_lora[1:2]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)

    base, pre_curve = pretrain(args, device)
    eval_batch = to_device(make_batch("-", 1024, torch.Generator().manual_seed(2)), device)
    grid = {"full": args.lrs_full, "lora": args.lrs_lora, "lora_ga": args.lrs_lora}
    runs: dict[str, dict[str, list]] = {m: {} for m in grid}
    for method, lrs in grid.items():
        for lr in lrs:
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                curve = finetune_arm(base, method, lr, seed, args, eval_batch, device)
                runs[method].setdefault(str(lr), []).append(curve)
                last = curve[-1]
                print(f"{method:8s} lr={lr:<7g} seed={seed} loss={last['loss']:.4f} "
                      f"exact={last['exact_match']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip

    def final_loss(curves):
        vals = [c[-1]["loss"] for c in curves]
        return statistics.fmean(vals) if all(math.isfinite(v) for v in vals) else math.inf

    best = {m: min(runs[m], key=lambda lr: final_loss(runs[m][lr])) for m in runs}
    evaluated = [pt["step"] for pt in next(iter(runs["full"].values()))[0]]
    steps_shown = sorted(
        {min(evaluated, key=lambda s, t=t: abs(s - t)) for t in (0, args.steps / 4, args.steps / 2, args.steps)}
    )
    summary = {}
    for method, lr in best.items():
        curves = runs[method][lr]
        by_step = {pt["step"]: [] for pt in curves[0]}
        for c in curves:
            for pt in c:
                by_step[pt["step"]].append(pt)
        summary[method] = {
            "lr": float(lr),
            "loss": {s: statistics.fmean(pt["loss"] for pt in by_step[s]) for s in steps_shown if s in by_step},
            "loss_std_final": statistics.pstdev([c[-1]["loss"] for c in curves]),
            "exact_match_final": statistics.fmean(c[-1]["exact_match"] for c in curves),
        }

    result = {
        "task": f"pretrain {N_DIGITS}-digit addition, fine-tune {N_DIGITS}-digit subtraction",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "pretrain_curve": pre_curve,
        "runs": runs,
        "best": summary,
    }
    (args.out / "convergence.json").write_text(json.dumps(result, indent=1))

    header = (
        f"{'method':9s} {'best lr':>8s} " + " ".join(f"{'loss@' + str(s):>10s}" for s in steps_shown) + "  exact-match"
    )
    print("\n" + header)
    for method, s in summary.items():
        losses = " ".join(f"{s['loss'][st]:10.4f}" for st in steps_shown)
        print(f"{method:9s} {s['lr']:8g} {losses}  {s['exact_match_final']:.3f}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot written (pip install matplotlib)")
        return 0
    fig, ax = plt.subplots(figsize=(7, 4.2))
    labels = {"full": "full fine-tuning", "lora": "LoRA", "lora_ga": "LoRA-GA"}
    for method, lr in best.items():
        curves = runs[method][lr]
        xs = [pt["step"] for pt in curves[0]]
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i]["loss"] for c in curves) for i in range(n)]
        lo = [min(c[i]["loss"] for c in curves) for i in range(n)]
        hi = [max(c[i]["loss"] for c in curves) for i in range(n)]
        ax.plot(xs[:n], mean, label=f"{labels[method]} (lr {float(lr):g})")
        ax.fill_between(xs[:n], lo, hi, alpha=0.2)
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out loss (subtraction)")
    ax.set_yscale("log")
    ax.set_title(f"Llama {args.layers}x{args.hidden}, r={args.r}: pretrained on addition, tuned on subtraction")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "convergence.png", dpi=120)
    print(f"wrote {args.out / 'convergence.json'} and {args.out / 'convergence.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
