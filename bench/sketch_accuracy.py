"""Accuracy of sketched LoRA-GA (``fastlora.lora_ga.sketch``) against the exact init, on real gradients (CPU).

For each model below, the exact averaged gradient ``G`` of every linear layer is estimated densely
(``fastlora.estimate_gradient``) and its top-2r singular vectors taken with an exact SVD; then for
each sketch width ``k`` (co-range ``2k + 1``), each ``passes`` in (1, 2) and ``--seeds`` sketch seeds,
the sketched estimate of the very same batches is compared with it:

* **principal angles** between the sketched and exact ``U[:, :2r]`` and ``V[:, :2r]`` per layer:
  the largest angle (degrees; the median and the worst layer), and the subspace overlap
  ``‖Uₛᵀ·Uₑ‖²_F / 2r`` (1 = same subspace), averaged over layers;
* **first-step alignment**, as tests/test_lora_ga_init.py defines it: after the LoRA-GA init (ArB2r,
  stable scale), one SGD step on the mean loss of the same batches; the cosine between the change
  of every layer's effective weight (concatenated) and the full fine-tuning step ``−G``. Reported
  for the exact init and for the sketched one, and their difference (the contract: ≥ −0.02).

Models (all run on the CPU in a few minutes):

* ``tiny``: tests/helpers.py's tiny Llama (hidden 64, 2 layers), random init, random tokens, r=4;
* ``small-text``: a Llama of hidden 256, intermediate 688, 4 layers, byte vocabulary, first trained
  for ``--pretrain-steps`` AdamW steps on real text (this Python's standard-library sources, read
  as bytes), then the gradient of held-out text, r=8 -- a model whose gradients have the structure
  a trained model's have;
* ``small-init``: the same architecture at random init on the same text (flat spectra: the hard case).

    python bench/sketch_accuracy.py                      # prints a table, writes bench/results/sketch_accuracy.json
    python bench/sketch_accuracy.py --quick              # fewer widths/seeds (a smoke run)

``--auto`` measures instead what a user gets from the defaults, ``patch(method="lora_ga",
sketch="auto")`` (``passes="auto"``: more passes only when the first pass's a-posteriori error
estimate exceeds ``AUTO_ERROR_THRESHOLD``, then until the predicted alignment rises by at most
``AUTO_ALIGNMENT_TOLERANCE`` per pass, at most ``AUTO_MAX_PASSES``), against the exact init, with
``passes=1`` and ``passes=2`` beside it, on Llama, Qwen2, GPT-2, Phi and Mistral configs (random
init, random tokens: flat spectra; widths 160 to 1024) and on text-trained models, r = 4, 8 and 16,
three sketch seeds. The threshold was set on the Llama models of hidden 256 (``TUNED``), the
tolerance on Llama-1024 (``WIDE_TUNED``) and the 8B-shape proxy of bench/NOTES.md; the other
families and widths are held out:

    python bench/sketch_accuracy.py --auto               # writes bench/results/sketch_auto_cpu.json
    python bench/sketch_accuracy.py --auto --only 1024,768 --json out.json   # cases whose label matches
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import NamedTuple

import torch
from common import token_batches

import fastlora
from fastlora.lora_ga import (
    GradientAccumulator,
    RangeAccumulator,
    SketchAccumulator,
    SketchedGradient,
    first_step_alignment,
    top_singular,
)
from fastlora.lora_ga.sketch import AUTO_ALIGNMENT_TOLERANCE, AUTO_ERROR_THRESHOLD, AUTO_MAX_PASSES

HERE = Path(__file__).resolve().parent


# -- models and data ---------------------------------------------------------------------------------------------


def llama(hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def text_bytes(limit: int = 4_000_000) -> torch.Tensor:
    """Real text, available offline: this interpreter's standard-library sources, as bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        b = path.read_bytes()
        chunks.append(b)
        total += len(b)
        if total >= limit:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def text_batches(corpus: torch.Tensor, n: int, batch: int, seq: int, seed: int, lo: float, hi: float) -> list[dict]:
    """``n`` batches of random windows from the ``[lo, hi)`` fraction of the corpus."""
    gen = torch.Generator().manual_seed(seed)
    a, b = int(lo * len(corpus)), int(hi * len(corpus)) - seq - 1
    out = []
    for _ in range(n):
        starts = torch.randint(a, b, (batch,), generator=gen)
        ids = torch.stack([corpus[s : s + seq] for s in starts.tolist()])
        out.append({"input_ids": ids, "labels": ids})
    return out


def pretrain(model, corpus: torch.Tensor, steps: int, batch: int, seq: int, lr: float = 2e-3) -> float:
    """A short AdamW run on the first 90% of the corpus; returns the last loss."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    loss = torch.tensor(float("nan"))
    for step, b in enumerate(text_batches(corpus, steps, batch, seq, seed=123, lo=0.0, hi=0.9)):
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0:
            print(f"  pretrain step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    model.requires_grad_(False)
    return float(loss.detach())


# -- metrics -----------------------------------------------------------------------------------------------------


def principal(U1: torch.Tensor, U2: torch.Tensor) -> tuple[float, float]:
    """(largest principal angle in degrees, overlap ‖U1ᵀU2‖²_F / q) of two orthonormal bases."""
    c = torch.linalg.svdvals(U1.double().t() @ U2.double()).clamp(max=1.0)
    return float(torch.rad2deg(torch.arccos(c.min()))), float((c**2).mean())


def first_step_cosine(model, data: list[dict], grads) -> float:
    """One SGD step on the mean loss of ``data``: cos(Δ effective weights, −G), all layers concatenated
    (the definition of tests/test_lora_ga_init.py)."""
    layers = fastlora.lora_layers(model)
    before = {n: layer.delta_weight().clone() for n, layer in layers.items()}
    for p in model.parameters():
        p.grad = None
    loss = sum(model(**b).loss for b in data) / len(data)
    loss.backward()
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A -= 1e-4 * layer.lora_A.grad
            layer.lora_B -= 1e-4 * layer.lora_B.grad
        d_eff = torch.cat([(layers[n].delta_weight() - before[n]).flatten() for n in layers])
        full = torch.cat([-grads[n].flatten() for n in layers])
        return float(torch.nn.functional.cosine_similarity(d_eff.double(), full.double(), dim=0))


class Fanout(GradientAccumulator):
    """Feeds every ``add`` to several accumulators: all sketch configurations in one pass over the data."""

    def __init__(self, accs: dict[tuple, GradientAccumulator]) -> None:
        first = next(iter(accs.values()))
        super().__init__(first.shapes)
        self.accs = accs

    def add(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        for acc in self.accs.values():
            acc.add(name, x, dy)
        self.updates[name] += 1

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{i}:{k}": t for i, acc in enumerate(self.accs.values()) for k, t in acc.state().items()}

    def result(self, num_batches: int) -> dict:
        return {key: acc.result(num_batches) for key, acc in self.accs.items()}


def widths(r: int, quick: bool) -> list[int]:
    ks = [2 * r + 4, 2 * r + 8, 2 * r + 16, 3 * r, 4 * r, 6 * r, 8 * r] if not quick else [2 * r + 8, 4 * r]
    return sorted(set(ks))


def evaluate(label: str, base, data: list[dict], r: int, args) -> dict:
    t0 = time.perf_counter()
    patched = fastlora.patch(copy.deepcopy(base), r=r, alpha=2 * r)
    exact = fastlora.estimate_gradient(patched, data, progress=False)
    names = list(exact)
    tops = {n: top_singular(exact[n], 2 * r, method="exact") for n in names}
    ga = fastlora.patch(
        copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, grads=exact, svd="exact", progress=False
    )
    cos_exact, per_layer_exact = first_step_alignment(ga, exact)
    cos_exact_sgd = first_step_cosine(ga, data, exact)
    dense_floats = sum(g.numel() for g in exact.values())
    shapes = {n: tuple(g.shape) for n, g in exact.items()}
    targets = fastlora.lora_layers(patched)

    # every (k, seed) sketch in one pass; the second passes of all of them in another
    grid = [(k, seed) for k in widths(r, args.quick) for seed in range(args.seeds)]
    first = {key: SketchAccumulator(shapes, key[0], seed=key[1]) for key in grid}
    res1 = fastlora.estimate_gradient(patched, data, progress=False, accumulator=Fanout(first), targets=targets)
    second = {key: RangeAccumulator(shapes, acc.corange_bases()) for key, acc in first.items()}
    res2 = fastlora.estimate_gradient(patched, data, progress=False, accumulator=Fanout(second), targets=targets)
    n_batches = res1.num_batches

    rows = []
    checked_sgd = None
    for k in widths(r, args.quick):
        for passes in (1, 2):
            runs = []
            for seed in range(args.seeds):
                factors = (res1 if passes == 1 else res2)[(k, seed)]
                sizes = first[(k, seed)].sizes
                if passes == 2:
                    sizes = {n: (sizes[n][0], second[(k, seed)].bases[n].shape[1]) for n in sizes}
                sk = SketchedGradient(factors, n_batches, passes, sizes)
                angU, angV, ovU, ovV = [], [], [], []
                for n in names:
                    Ue, _, Vhe = tops[n]
                    a, o = principal(Ue, sk[n].U[:, : 2 * r])
                    angU.append(a)
                    ovU.append(o)
                    a, o = principal(Vhe.t(), sk[n].Vh[: 2 * r].t())
                    angV.append(a)
                    ovV.append(o)
                model = fastlora.patch(
                    copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, grads=sk, progress=False
                )
                cos, per_layer = first_step_alignment(model, exact)
                if checked_sgd is None:  # the closed form against a real SGD step, once per model
                    checked_sgd = {
                        "k": k,
                        "passes": passes,
                        "analytic": cos,
                        "sgd": first_step_cosine(model, data, exact),
                    }
                runs.append(
                    {
                        "cos": cos,
                        "layer_delta_worst": min(per_layer[n] - per_layer_exact[n] for n in per_layer),
                        "layer_cos_mean": statistics.fmean(per_layer.values()),
                        "angU_median": statistics.median(angU),
                        "angU_max": max(angU),
                        "angV_median": statistics.median(angV),
                        "angV_max": max(angV),
                        "overlapU": statistics.fmean(ovU),
                        "overlapV": statistics.fmean(ovV),
                    }
                )
            if passes == 1:
                floats = sum(kk * max(shapes[n]) + kl * min(shapes[n]) for n, (kk, kl) in sizes.items())
            else:
                floats = sum(kl * max(shapes[n]) for n, (_, kl) in sizes.items())
            cos = [x["cos"] for x in runs]
            row = {
                "k": k,
                "passes": passes,
                "cos_mean": statistics.fmean(cos),
                "cos_min": min(cos),
                "delta_vs_exact_worst": min(cos) - cos_exact,
                "layer_delta_worst": min(x["layer_delta_worst"] for x in runs),
                "memory_vs_dense": floats / dense_floats,
                **{
                    key: statistics.fmean(x[key] for x in runs)
                    for key in runs[0]
                    if key not in ("cos", "layer_delta_worst")
                },
                "angU_max_worst": max(x["angU_max"] for x in runs),
                "angV_max_worst": max(x["angV_max"] for x in runs),
            }
            rows.append(row)
            print(
                f"  {label:11s} k={k:3d} passes={passes}: cos {row['cos_mean']:.4f} (min {row['cos_min']:.4f}, exact "
                f"{cos_exact:.4f}, Δ {row['delta_vs_exact_worst']:+.4f}; worst layer Δ {row['layer_delta_worst']:+.3f})"
                f"  ∠U med/max {row['angU_median']:5.1f}/{row['angU_max_worst']:5.1f}°  ∠V {row['angV_median']:5.1f}/"
                f"{row['angV_max_worst']:5.1f}°  overlap U {row['overlapU']:.3f} V {row['overlapV']:.3f}",
                flush=True,
            )
    # how separated the subspace LoRA-GA uses is: s_2r / s_2r+1 (1 = no gap), and the energy in the top 2r
    gaps, energy = [], []
    for n in names:
        sv = torch.linalg.svdvals(exact[n].double())
        gaps.append(float(sv[2 * r - 1] / sv[2 * r].clamp_min(1e-300)))
        energy.append(float((sv[: 2 * r] ** 2).sum() / (sv**2).sum()))
    return {
        "model": label,
        "r": r,
        "layers": len(names),
        "tokens": sum(b["input_ids"].numel() for b in data),
        "cos_exact": cos_exact,
        "cos_exact_sgd_step": cos_exact_sgd,
        "sketch_sgd_check": checked_sgd,
        "median_gap_s2r_over_s2r+1": statistics.median(gaps),
        "median_energy_top2r": statistics.median(energy),
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }


# -- --auto: the defaults on several families -------------------------------------------------------------------


class Case(NamedTuple):
    """One model of the ``--auto`` suite: ``family`` at ``hidden`` width (MLP ``mlp`` × hidden,
    ``layers`` decoder layers, ``heads`` attention heads), on ``data`` ("random" tokens, "text", or
    "text-trained": text after a short pretraining), for each LoRA rank in ``ranks``; random-token
    data is ``batches`` batches of 2 × ``seq`` tokens."""

    label: str
    family: str
    hidden: int
    data: str
    ranks: tuple[int, ...]
    mlp: float = 2.5
    layers: int = 2
    heads: int = 4
    batches: int = 6
    seq: int = 64


# TUNED set AUTO_ERROR_THRESHOLD (the first pass's gate); WIDE-TUNED, with the 8B-width proxy of
# bench/NOTES.md, AUTO_ALIGNMENT_TOLERANCE (when later passes stop); the rest are held out.
TUNED = [
    Case("llama-256 random", "llama", 256, "random", (4, 8)),
    Case("llama-256 text-trained", "llama", 256, "text-trained", (4, 8)),
    Case("llama-256 text-init", "llama", 256, "text", (8,)),
]
WIDE_TUNED = [
    Case("llama-1024 random", "llama", 1024, "random", (4, 16), mlp=2.75, heads=16, batches=2, seq=1024),
]
HELD_OUT = [
    Case("qwen2-160 random", "qwen2", 160, "random", (4, 8)),
    Case("gpt2-160 random", "gpt2", 160, "random", (4, 8)),
    Case("phi-160 random", "phi", 160, "random", (4, 8)),
    Case("mistral-448 random", "mistral", 448, "random", (4, 8)),
    Case("llama-512 random", "llama", 512, "random", (4,)),
    Case("mistral-768 random", "mistral", 768, "random", (8, 16), mlp=3.5, heads=12, batches=2, seq=1024),
    Case("qwen2-896 random", "qwen2", 896, "random", (4, 16), mlp=2.75, heads=14, batches=2, seq=1024),
    Case("gpt2-512 random", "gpt2", 512, "random", (8,), mlp=4.0, heads=8, batches=2, seq=1024),
    Case("qwen2-160 text-trained", "qwen2", 160, "text-trained", (4, 8)),
    Case("gpt2-160 text-trained", "gpt2", 160, "text-trained", (4,)),
]


def family_model(
    family: str, hidden: int, layers: int = 2, seed: int = 0, mlp: float = 2.5, heads: int = 4, positions: int = 256
):
    """A causal LM of ``family`` with ``hidden`` width, MLP ``mlp`` × hidden, ``heads`` heads (KV heads:
    the largest of 1, 2, 4 that divides ``heads`` and is at most half of it), byte vocabulary,
    ``positions`` positions, random init."""
    import transformers as T

    torch.manual_seed(seed)
    inter, common = int(hidden * mlp), dict(vocab_size=256, tie_word_embeddings=False)
    if family == "gpt2":
        cfg = T.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=positions, n_inner=inter, **common)
        cfg.bos_token_id = cfg.eos_token_id = 0
        return T.GPT2LMHeadModel(cfg).eval()
    config, model = {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
        "mistral": (T.MistralConfig, T.MistralForCausalLM),
        "phi": (T.PhiConfig, T.PhiForCausalLM),
    }[family]
    kv_heads = max(d for d in (1, 2, 4) if heads % d == 0 and d <= max(1, heads // 2))
    kv = {} if family == "phi" else {"num_key_value_heads": kv_heads}
    cfg = config(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=positions, **kv, **common,
    )  # fmt: skip
    return model(cfg).eval()


def auto_case(label: str, base, data: list[dict], r: int, seeds: int) -> dict:
    """The exact init against sketch="auto" with passes "auto", 1 and 2, for ``seeds`` sketch seeds."""
    t0 = time.perf_counter()
    patched = fastlora.patch(copy.deepcopy(base), r=r, alpha=2 * r)
    exact = fastlora.estimate_gradient(patched, data, progress=False)
    ga = fastlora.patch(
        copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, grads=exact, svd="exact", progress=False
    )
    cos_exact, per_layer_exact = first_step_alignment(ga, exact)
    energy = []
    for g in exact.values():
        sv = torch.linalg.svdvals(g.double())
        energy.append(float((sv[: 2 * r] ** 2).sum() / (sv**2).sum()))
    runs = []
    for seed in range(seeds):
        run = {"seed": seed}
        for passes in ("auto", 1, 2):
            t1 = time.perf_counter()
            sk = fastlora.estimate_gradient(patched, data, sketch="auto", passes=passes, seed=seed, progress=False)
            secs = time.perf_counter() - t1
            model = fastlora.patch(copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, grads=sk, progress=False)
            cos, per_layer = first_step_alignment(model, exact)
            run[str(passes)] = {
                "cos": cos,
                "delta": cos - cos_exact,
                "layer_delta_worst": min(per_layer[n] - per_layer_exact[n] for n in per_layer),
                "passes_taken": sk.passes,
                "energy_changes": [(b - a) / b for a, b in zip(sk.energies, sk.energies[1:])],
                "predicted_alignments": sk.alignments,
                "error_max": max(sk.errors.values()) if sk.errors else None,
                "error_median": statistics.median(sk.errors.values()) if sk.errors else None,
                "seconds": secs,
            }
        runs.append(run)
    out = {
        "model": label,
        "r": r,
        "layers": len(exact),
        "tokens": sum(b["input_ids"].numel() for b in data),
        "cos_exact": cos_exact,
        "median_energy_top2r": statistics.median(energy),
        "runs": runs,
        "seconds": time.perf_counter() - t0,
    }
    for key in ("auto", "1", "2"):
        out[f"delta_worst_{key}"] = min(x[key]["delta"] for x in runs)
    out["auto_passes"] = [x["auto"]["passes_taken"] for x in runs]
    out["error_max"] = max(x["auto"]["error_max"] for x in runs)
    out["auto_seconds_vs_one_pass"] = statistics.fmean(x["auto"]["seconds"] / x["1"]["seconds"] for x in runs)
    print(
        f"  {label:24s} r={r:2d}: exact {cos_exact:.4f}  Δ auto {out['delta_worst_auto']:+.4f} "
        f"(passes {out['auto_passes']}, est. error max {out['error_max']:.3f})  Δ 1 pass "
        f"{out['delta_worst_1']:+.4f}  Δ 2 passes {out['delta_worst_2']:+.4f}",
        flush=True,
    )
    return out


def auto_suite(args, save) -> dict:
    """Every case of TUNED, WIDE_TUNED and HELD_OUT whose label contains one of ``args.only``;
    ``save(results)`` after each (model, r), so an interrupted run keeps what it measured."""
    corpus = text_bytes()
    results = {
        "threshold": AUTO_ERROR_THRESHOLD,
        "alignment_tolerance": AUTO_ALIGNMENT_TOLERANCE,
        "max_passes": AUTO_MAX_PASSES,
        "pretrain_steps": args.pretrain_steps,
        "cases": [],
    }
    only = [x for x in (args.only or "").split(",") if x]
    for group, cases in (("tuned", TUNED), ("wide-tuned", WIDE_TUNED), ("held-out", HELD_OUT)):
        for case in cases:
            if only and not any(x in case.label for x in only):
                continue
            base = family_model(case.family, case.hidden, case.layers, mlp=case.mlp, heads=case.heads,
                                positions=max(256, case.seq))  # fmt: skip
            if case.data == "random":
                data = token_batches(case.batches, 2, case.seq, 256, seed=1)
            else:
                data = text_batches(corpus, 6, 4, 128, seed=7, lo=0.9, hi=1.0)
                if case.data == "text-trained":
                    pretrain(base, corpus, args.pretrain_steps, 8, 128)
            for r in case.ranks:
                res = auto_case(case.label, base, data, r, args.seeds)
                res["group"] = group
                res["config"] = case._asdict()
                results["cases"].append(res)
                save(results)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default="tiny,small-text,small-init")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--auto", action="store_true", help="the defaults on several families (see the docstring)")
    p.add_argument("--only", default=None, help="--auto: only the cases whose label contains one of these (a,b,...)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.batches, args.pretrain_steps = 2, 4, 50
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {"torch": torch.__version__, "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.auto:
        if args.seeds == 5 and not args.quick:
            args.seeds = 3
        if args.pretrain_steps == 400:
            args.pretrain_steps = 300
        path = args.json or HERE / "results" / "sketch_auto_cpu.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        results.update(auto_suite(args, lambda res: path.write_text(json.dumps({**results, **res}, indent=1))))
        path.write_text(json.dumps(results, indent=1))
        print(
            f"\n{'model':24s} {'r':>2s} {'cos exact':>9s} {'Δ auto':>8s} {'auto passes':>11s} {'Δ 1 pass':>9s} "
            f"{'Δ 2 pass':>9s}"
        )
        for c in results["cases"]:
            taken = ",".join(map(str, c["auto_passes"]))
            print(
                f"{c['model']:24s} {c['r']:2d} {c['cos_exact']:9.4f} {c['delta_worst_auto']:+8.4f} {taken:>11s} "
                f"{c['delta_worst_1']:+9.4f} {c['delta_worst_2']:+9.4f}"
            )
        print(f"wrote {path}")
        return 0
    models = args.models.split(",")
    out = []
    if "tiny" in models:
        sys.path.insert(0, str(HERE.parent / "tests"))
        from helpers import tiny_llama

        out.append(evaluate("tiny", tiny_llama(), token_batches(args.batches, 2, 16, 96, seed=0), 4, args))
    if "small-text" in models or "small-init" in models:
        corpus = text_bytes()
        data = text_batches(corpus, args.batches, 4, 128, seed=7, lo=0.9, hi=1.0)
        arch = dict(hidden=256, inter=688, layers=4, heads=8, kv=4, vocab=256)
        if "small-init" in models:
            out.append(evaluate("small-init", llama(**arch), data, 8, args))
        if "small-text" in models:
            model = llama(**arch)
            loss = pretrain(model, corpus, args.pretrain_steps, 8, 128)
            print(f"  pretrained {args.pretrain_steps} steps: loss {loss:.3f}", flush=True)
            res = evaluate("small-text", model, data, 8, args)
            res["pretrain_steps"], res["pretrain_loss"] = args.pretrain_steps, loss
            out.append(res)
    results["models"] = out
    args.json = args.json or HERE / "results" / "sketch_accuracy.json"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))

    print(f"\n{'model':11s} {'r':>2s} {'k':>4s} {'pass':>4s} {'mem/dense':>9s} {'cos exact':>9s} {'cos sketch':>10s} "
          f"{'Δ worst':>8s} {'∠U med/max':>12s} {'∠V med/max':>12s}")  # fmt: skip
    for m in out:
        for row in m["rows"]:
            print(
                f"{m['model']:11s} {m['r']:2d} {row['k']:4d} {row['passes']:4d} {row['memory_vs_dense']:9.3f} "
                f"{m['cos_exact']:9.4f} {row['cos_mean']:10.4f} {row['delta_vs_exact_worst']:+8.4f} "
                f"{row['angU_median']:5.1f}/{row['angU_max_worst']:5.1f}° {row['angV_median']:5.1f}/{row['angV_max_worst']:5.1f}°"
            )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
