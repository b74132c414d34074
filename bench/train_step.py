"""Training-step benchmark: fastlora vs PEFT + bitsandbytes vs Unsloth's LoRA kernels, whole Llama models.

Three Llama shapes (random weights, vocab 128256), NF4 with double quantisation (blocksize 64), r=16
on every decoder linear, AdamW, the same weights, the same A and B and the same batches in every arm:

    1b   hidden 2048, MLP 8192,  16 layers, 32/8 heads, 4x1024 tokens
    3b   hidden 3072, MLP 8192,  28 layers, 24/8 heads, 2x2048 tokens
    8b8  hidden 4096, MLP 14336,  8 layers (Llama-3-8B cut), 32/8 heads, 2x2048 tokens

Arms (``--arms``; all eager unless named ``-compile``, which wraps the model in ``torch.compile``):

    fastlora-nf4            fastlora.patch: grouped q/k/v and fused gated MLP (the default)
    fastlora-nf4-perlayer   fastlora.patch(fuse_blocks=False): one LoraLinear op per projection
    fastlora-nf4-nofold     fastlora-nf4 with the grouped forward adding each member's LoRA term to its
                            output instead of folding it into the base GEMM (fastlora.grouped.FOLD_FORWARD)
    peft-bnb-nf4            PEFT LoRA on bitsandbytes Linear4bit
    unsloth-nf4             the PEFT model with its projections routed through Unsloth's LoRA_QKV,
                            LoRA_MLP (apply_lora_mlp_swiglu) and LoRA_W (apply_lora_o), imported from
                            ``--peer`` (``from unsloth.kernels.fast_lora import ...``); skipped with a
                            message where they are missing
    fastlora-bf16, peft-bf16                 the same on a bf16 base
    fastlora-nf4-compile, peft-bnb-nf4-compile, unsloth-nf4-compile

Reported per arm: the losses of the first steps (every arm starts from the same function, so they
must agree with PEFT + bnb's to bf16 noise), tokens/s (median step time, CUDA events around
forward + backward + optimizer step), peak GPU memory (``max_memory_allocated`` minus what was
allocated before the arm built its model copy) and the activation peak (minus what the built model
held), and ratios to PEFT + bnb in the same run.

    python bench/train_step.py                                    # 3 shapes, eager arms
    python bench/train_step.py --models 3b --arms peft-bnb-nf4 fastlora-nf4-compile
    python bench/train_step.py --tiny                             # CPU smoke run of the script

Needs a CUDA GPU, bitsandbytes, transformers and peft. Prints a table; writes ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import statistics
import sys
import time
import traceback
import types
import zlib
from pathlib import Path

import torch
from common import quantize_linears, token_batches

import fastlora

GIB = 1024**3
ARMS = (
    "peft-bnb-nf4",
    "unsloth-nf4",
    "fastlora-nf4",
    "fastlora-nf4-perlayer",
    "fastlora-nf4-nofold",
    "fastlora-bf16",
    "peft-bf16",
    "fastlora-nf4-compile",
    "peft-bnb-nf4-compile",
    "unsloth-nf4-compile",
)
DEFAULT_ARMS = ("peft-bnb-nf4", "unsloth-nf4", "fastlora-nf4")
# name: (hidden, intermediate, layers, heads, kv heads, batch, seq)
MODELS = {
    "1b": (2048, 8192, 16, 32, 8, 4, 1024),
    "3b": (3072, 8192, 28, 24, 8, 2, 2048),
    "8b8": (4096, 14336, 8, 32, 8, 2, 2048),
}


def llama_config(name: str, layers: int | None, tiny: bool):
    from transformers import LlamaConfig

    hidden, inter, n_layers, heads, kv, _, _ = MODELS[name]
    if tiny:  # same structure, CPU-sized
        hidden, inter, heads, kv, vocab = hidden // 32, inter // 32, 4, 2, 256
    else:
        vocab = 128256
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers or n_layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False,
    )  # fmt: skip


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


# ------------------------------------------------------------------------------------------------
# the same A and B in every arm
# ------------------------------------------------------------------------------------------------
def lora_init(name: str, r: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic ``(A [r, k], B [n, r])`` for the layer called ``name``: A as PEFT's Kaiming
    init, B small and nonzero (so that the first step already runs the LoRA terms)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    bound = 1.0 / k**0.5
    return torch.empty(r, k).uniform_(-bound, bound, generator=gen), torch.randn(n, r, generator=gen) * 1e-3


@torch.no_grad()
def set_lora_fastlora(model) -> None:
    for name, layer in fastlora.lora_layers(model).items():
        A, B = lora_init(name, layer.r, layer.in_features, layer.out_features)
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)


@torch.no_grad()
def set_lora_peft(peft_model) -> None:
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    for name, m in inner.named_modules():
        if isinstance(m, LoraLayer) and "default" in m.lora_A:
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            A, B = lora_init(name, a.shape[0], a.shape[1], b.shape[0])
            a.copy_(A)
            b.copy_(B)


# ------------------------------------------------------------------------------------------------
# arms
# ------------------------------------------------------------------------------------------------
def build_fastlora(base, args, fuse: bool, fold: bool = True):
    from fastlora import grouped

    grouped.FOLD_FORWARD = fold  # set by every fastlora arm: the arms run one after another
    model = fastlora.patch(copy.deepcopy(base), r=args.r, alpha=args.alpha, fuse_blocks=fuse)
    set_lora_fastlora(model)
    return model, [p for p in model.parameters() if p.requires_grad]


def build_peft(base, args):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules="all-linear", lora_dropout=0.0)
    )
    set_lora_peft(model)
    return model, [p for p in model.parameters() if p.requires_grad]


def import_unsloth(peer: Path):
    """Unsloth's LoRA functions from ``peer`` (see ../shared/tools/unsloth-peer.sh), or an error string."""
    if str(peer) not in sys.path:
        sys.path.insert(0, str(peer))
    try:
        from unsloth.kernels.fast_lora import apply_lora_mlp_swiglu, apply_lora_o, apply_lora_qkv
    except Exception as exc:  # missing folder, or its imports fail on this machine
        return f"{type(exc).__name__}: {exc}"
    return types.SimpleNamespace(qkv=apply_lora_qkv, mlp=apply_lora_mlp_swiglu, o=apply_lora_o)


class _Stash(torch.nn.Module):
    """Stands in a q/k/v slot of the attention: returns the output Unsloth's LoRA_QKV computed."""

    def __init__(self, holder: torch.nn.Module, index: int) -> None:
        super().__init__()
        self.index = index
        self.__dict__["holder"] = holder  # not a submodule (no second path to the same parameters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.holder.stash[self.index]
        self.holder.stash[self.index] = None
        return out


class _UnslothQKV(torch.nn.Module):
    """Holds the PEFT q/k/v layers; a pre-hook on the attention runs LoRA_QKV once per forward."""

    def __init__(self, q, k, v, fn) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q, k, v
        self.fn = fn
        self.stash: list[torch.Tensor | None] = [None, None, None]

    def pre_hook(self, attn, args, kwargs):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.stash = list(self.fn(self, x, inplace=False))


class _UnslothO(torch.nn.Module):
    def __init__(self, o, fn) -> None:
        super().__init__()
        self.o_proj, self.fn = o, fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self, x)


def build_unsloth(base, args, fns):
    """The PEFT model with Unsloth's LoRA functions routed in, as Unsloth's own Llama patch does."""
    model, params = build_peft(base, args)
    for layer in model.base_model.model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        holder = _UnslothQKV(attn.q_proj, attn.k_proj, attn.v_proj, fns.qkv)
        attn.unsloth_qkv = holder
        attn.q_proj, attn.k_proj, attn.v_proj = (_Stash(holder, i) for i in range(3))
        attn.register_forward_pre_hook(holder.pre_hook, with_kwargs=True)
        attn.o_proj = _UnslothO(attn.o_proj, fns.o)
        mlp.forward = types.MethodType(lambda self, x: fns.mlp(self, x, inplace=False), mlp)
    return model, params


def step_fn(model, opt, losses: list[float], keep: int):
    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if len(losses) < keep:
            losses.append(loss.item())
        return loss

    return step


def profile_step(step, batch, path: Path) -> None:
    """One step under ``torch.profiler`` (CPU + CUDA): the ops by self CPU time and the CUDA kernel count
    (where the host time of an eager step goes), written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if batch.is_cuda else [])
    with profile(activities=acts) as prof:
        step(batch)
        if batch.is_cuda:
            torch.cuda.synchronize()
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    avg = prof.key_averages()
    tables = [avg.table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=70)]
    if batch.is_cuda:
        tables.append(avg.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70))
    # The Python side of the same step (cProfile, by own time): which of our functions the host spends
    # the step in, below the level of torch ops.
    import cProfile
    import io
    import pstats

    if batch.is_cuda:
        torch.cuda.synchronize()
    prof_py = cProfile.Profile()
    prof_py.runcall(step, batch)
    if batch.is_cuda:
        torch.cuda.synchronize()
    py = io.StringIO()
    pstats.Stats(prof_py, stream=py).sort_stats("tottime").print_stats(40)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"CUDA kernels in one step: {kernels}\n" + "\n".join(tables) + "\n" + py.getvalue())


def run_arm(label, build, batches, args, checkpointing: bool = False, compile_model: bool = False) -> dict:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    base_mem = mem_allocated()
    t0 = time.perf_counter()
    model = opt = fwd = None
    try:
        model, params = build()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        opt = torch.optim.AdamW(params, lr=args.lr)
        built_mem = mem_allocated()
        fwd = torch.compile(model) if compile_model else model
        losses: list[float] = []
        step = step_fn(fwd, opt, losses, keep=args.warmup)
        cuda = batches[0].is_cuda
        for i in range(args.warmup):  # the first steps: their losses are compared between arms
            step(batches[i % len(batches)])
        if cuda:
            torch.cuda.synchronize()
        times = []
        for i in range(args.iters):
            with Timer(cuda) as t:
                step(batches[(args.warmup + i) % len(batches)])
            times.append(t.seconds)
        if args.profile is not None:
            profile_step(step, batches[0], args.profile / f"profile_{label}{'_ckpt' if checkpointing else ''}.txt")
    except Exception as exc:  # report a failing arm (e.g. a compile error) and keep the others
        traceback.print_exc()
        return {"arm": label, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    finally:
        del model, opt, fwd
    med = statistics.median(times)
    peak = mem_allocated(peak=True)
    return {
        "arm": label,
        "checkpointing": checkpointing,
        "first_losses": losses,
        "step_s": med,
        "step_s_min": min(times),
        "tokens_per_s": batches[0].numel() / med,
        "peak_gib": (peak - base_mem) / GIB,
        "peak_act_gib": (peak - built_mem) / GIB,
        "wall_s": time.perf_counter() - t0,
        "trainable": sum(p.numel() for p in params),
    }


def arm_builders(args, base_nf4, base_bf16, unsloth):
    out = {
        "fastlora-nf4": lambda: build_fastlora(base_nf4, args, True),
        "fastlora-nf4-perlayer": lambda: build_fastlora(base_nf4, args, False),
        "fastlora-nf4-nofold": lambda: build_fastlora(base_nf4, args, True, fold=False),
        "peft-bnb-nf4": lambda: build_peft(base_nf4, args),
        "fastlora-bf16": lambda: build_fastlora(base_bf16, args, True),
        "peft-bf16": lambda: build_peft(base_bf16, args),
    }
    if not isinstance(unsloth, str):
        out["unsloth-nf4"] = lambda: build_unsloth(base_nf4, args, unsloth)
    for name in ("fastlora-nf4", "peft-bnb-nf4", "unsloth-nf4"):
        if name in out:
            out[name + "-compile"] = out[name]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--layers", type=int, default=None, help="override every model's layer count")
    p.add_argument("--shapes", nargs="+", default=None, help="BxS token shapes instead of each model's own")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=3, help="first steps, untimed; their losses are compared")
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1, help="run the arms this many times, interleaved; report medians")
    p.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=ARMS)
    p.add_argument("--checkpointing", action="store_true", help="also run every arm with gradient checkpointing")
    p.add_argument("--no-compile", action="store_true", help="drop the -compile arms from --arms")
    p.add_argument("--peer", type=Path, default=Path(__file__).resolve().parents[1] / ".peer",
                   help="folder holding unsloth/kernels (../shared/tools/unsloth-peer.sh)")  # fmt: skip
    p.add_argument("--budget-s", type=float, default=None, help="skip the remaining arms after this many seconds")
    p.add_argument("--profile", type=Path, default=None, help="write a torch.profiler table of one step per arm here")
    p.add_argument("--json", type=Path, default=Path("train_step.json"))
    p.add_argument("--tiny", action="store_true", help="small models on the CPU: checks the script, not speed")
    p.add_argument("--report", type=Path, nargs="+", default=None,
                   help="only print the table of these result files (merged; e.g. runs split over GPUs)")  # fmt: skip
    args = p.parse_args(argv)
    if args.report:
        files = [json.loads(f.read_text()) for f in args.report]
        merged = {**files[0], "runs": [r for f in files for r in f["runs"]]}
        args.r, args.alpha, args.json = merged["r"], merged.get("alpha", args.alpha), args.report[0]
        return print_table(merged, args)
    if not torch.cuda.is_available() and not args.tiny:
        raise SystemExit("bench/train_step.py needs a CUDA GPU (or --tiny for a CPU smoke run)")
    from transformers import LlamaForCausalLM

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arms = [a for a in args.arms if not (args.no_compile and a.endswith("-compile"))]
    unsloth = import_unsloth(args.peer) if any(a.startswith("unsloth") for a in arms) else "not asked for"
    if device.type != "cuda" and not isinstance(unsloth, str):
        unsloth = "Unsloth's LoRA kernels need CUDA"
    if isinstance(unsloth, str) and any(a.startswith("unsloth") for a in arms):
        print(f"unsloth arms skipped: {unsloth}", flush=True)
    results = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke run)",
               "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "r": args.r,
               "alpha": args.alpha, "unsloth": "ok" if not isinstance(unsloth, str) else unsloth,
               "runs": []}  # fmt: skip
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        pass

    for name in args.models:
        cfg = llama_config(name, args.layers, args.tiny)
        b, s = MODELS[name][5:]
        shapes = args.shapes or [f"{b}x{s}" if not args.tiny else "2x64"]
        torch.manual_seed(0)
        with torch.device(device):
            base_bf16 = LlamaForCausalLM(cfg).to(torch.bfloat16)
        base_bf16.requires_grad_(False)
        base_nf4 = quantize_linears(copy.deepcopy(base_bf16), device)  # one quantisation, shared by NF4 arms
        if not any(a.endswith("bf16") for a in arms):
            del base_bf16
            base_bf16 = None
        builders = arm_builders(args, base_nf4, base_bf16, unsloth)
        for shape in shapes:
            bsz, seq = (int(v) for v in shape.split("x"))
            batches = [t["input_ids"] for t in token_batches(4, bsz, seq, cfg.vocab_size, seed=1, device=device)]
            for ckpt, rnd, label in itertools.product(
                [False] + ([True] if args.checkpointing else []), range(args.rounds), arms
            ):
                if label in builders:
                    if args.budget_s and time.perf_counter() - start > args.budget_s:
                        r = {"arm": label, "error": f"skipped: --budget-s {args.budget_s:g} s spent"}
                    else:
                        r = run_arm(label, builders[label], batches, args, ckpt, label.endswith("-compile"))
                    r.update(model=name, shape=shape, layers=cfg.num_hidden_layers, checkpointing=ckpt, round=rnd)
                    results["runs"].append(r)
                    print(json.dumps(r), flush=True)
                    args.json.write_text(json.dumps(results, indent=1))  # a run cut short keeps its arms
        del base_nf4, base_bf16, builders
    args.json.write_text(json.dumps(results, indent=1))
    return print_table(results, args)


def merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per arm: with ``--rounds`` the median tok/s over the rounds (the arms' rounds interleave,
    so a slow spell of this shared host touches every arm alike), the largest peak, and the spread."""
    out = []
    for arm in dict.fromkeys(r["arm"] for r in rows):
        runs = [r for r in rows if r["arm"] == arm and "error" not in r]
        if not runs:
            out.append(next(r for r in rows if r["arm"] == arm))
            continue
        tps = sorted(r["tokens_per_s"] for r in runs)
        merged = dict(runs[0], tokens_per_s=statistics.median(tps), tps_rounds=tps)
        merged.update(peak_gib=max(r["peak_gib"] for r in runs), peak_act_gib=max(r["peak_act_gib"] for r in runs))
        out.append(merged)
    return out


def print_table(results: dict, args) -> int:
    print(f"\n{results['gpu']}, r={args.r}, alpha={args.alpha:g}, AdamW, NF4 + double quant; ratios ÷ PEFT+bnb")
    head = f"{'model':5s} {'shape':7s} {'ckpt':5s} {'arm':22s} {'tok/s':>9s} {'peak GiB':>9s} {'act GiB':>8s}"
    print(head + f" {'tok/s ×':>8s} {'peak ×':>7s} {'act ×':>6s}  first losses (Δ vs PEFT+bnb)")
    keys = []
    for r in results["runs"]:
        key = (r["model"], r["shape"], r.get("checkpointing", False))
        if key not in keys:
            keys.append(key)
    for key in keys:
        rows = merge_rounds(
            [r for r in results["runs"] if (r["model"], r["shape"], r.get("checkpointing", False)) == key]
        )
        ref = next((r for r in rows if r["arm"] == "peft-bnb-nf4" and "error" not in r), None)
        for r in rows:
            pre = f"{key[0]:5s} {key[1]:7s} {key[2]!s:5s} {r['arm']:22s}"
            if "error" in r:
                print(f"{pre} failed: {r['error'][:90]}")
                continue

            def ratio(k, r=r, ref=ref):
                return r[k] / ref[k] if ref and ref[k] else float("nan")

            losses = " ".join(f"{v:.4f}" for v in r["first_losses"])
            if ref:
                d = max((abs(a - b) for a, b in zip(r["first_losses"], ref["first_losses"])), default=float("nan"))
                losses += f" ({d:.1e})"
            spread = (
                f"  rounds {min(r['tps_rounds']):.0f}-{max(r['tps_rounds']):.0f}" if len(r["tps_rounds"]) > 1 else ""
            )
            print(
                f"{pre} {r['tokens_per_s']:9.0f} {r['peak_gib']:9.2f} {r['peak_act_gib']:8.2f}"
                f" {ratio('tokens_per_s'):8.2f} {ratio('peak_gib'):7.2f} {ratio('peak_act_gib'):6.2f}  {losses}{spread}"
            )
    if not args.report:
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
