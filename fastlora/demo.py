"""``python -m fastlora.demo``: patch a small Llama, train a few steps, save, reload with PEFT.

Runs on the CPU in well under a minute. The model is built from a config with random weights (no
download); the task is to continue a fixed repeating token pattern, which a LoRA learns quickly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import tempfile
import time
from pathlib import Path

import torch

import fastlora


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: fall back to one line per step
        for i, item in enumerate(iterable):
            print(f"{desc}: step {i + 1}/{total}", flush=True)
            yield item
        return
    yield from tqdm(iterable, total=total, desc=desc)


def _batches(pattern: torch.Tensor, batch: int, seq: int, seed: int):
    """Windows of the cyclic ``pattern`` at random offsets (the held-out set uses other offsets' RNG)."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, 16, (batch, 1), generator=gen)
        yield pattern[(starts + torch.arange(seq)) % 16]


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m fastlora.demo", description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--out", type=Path, default=None, help="adapter directory (default: a temp dir)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.05,
    )  # fmt: skip
    base = LlamaForCausalLM(config).eval()
    model = fastlora.patch(copy.deepcopy(base), r=args.r, alpha=args.alpha)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    pattern = torch.randperm(config.vocab_size, generator=torch.Generator().manual_seed(args.seed))[:16]
    data = _batches(pattern, batch=8, seq=32, seed=args.seed)
    eval_ids = next(_batches(pattern, batch=8, seq=32, seed=args.seed + 1))

    def eval_loss(m) -> float:
        m.eval()
        with torch.no_grad():
            return m(input_ids=eval_ids, labels=eval_ids).loss.item()

    loss_before = eval_loss(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    t0 = time.perf_counter()
    model.train()
    for ids in _progress((next(data) for _ in range(args.steps)), args.steps, "training"):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    loss_after = eval_loss(model)

    with contextlib.ExitStack() as stack:
        if args.out is None:  # a temp folder, removed when the demo ends (--out keeps the adapter)
            out = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fastlora-demo-"))) / "adapter"
        else:
            out = args.out
        fastlora.save_adapter(model, out)
        files = sorted(out.iterdir())

        print()
        print(f"model            Llama, {config.num_hidden_layers} layers, hidden {config.hidden_size}, random init")
        print(f"LoRA             r={args.r}, alpha={args.alpha:g}, {len(fastlora.lora_layers(model))} layers patched")
        print(f"trainable params {n_lora:,} of {n_all:,} ({100 * n_lora / n_all:.2f}%)")
        print(f"held-out loss    {loss_before:.3f} -> {loss_after:.3f} after {args.steps} steps ({train_s:.1f} s)")
        print(f"adapter          {out}" + ("" if args.out else " (temporary: pass --out DIR to keep it)"))
        for f in files:
            print(f"                 {f.name} ({f.stat().st_size:,} bytes)")
        try:
            from peft import PeftModel
        except ImportError:
            print("PEFT reload      skipped: peft is not installed (pip install peft)")
        else:
            reloaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
            with torch.no_grad():
                diff = (reloaded(input_ids=eval_ids).logits - model(input_ids=eval_ids).logits).abs().max().item()
            print(f"PEFT reload      loss {eval_loss(reloaded):.3f}, max |logit difference| {diff:.2e}")
            if diff > 1e-4:
                print("error: the PEFT-loaded adapter does not reproduce the trained model")
                return 1
    if loss_after >= loss_before:
        print("error: training did not reduce the loss")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
