"""Multi-GPU scaling of the fastlora train step: tokens/s on 1 vs N GPUs under DDP and FSDP2.

The model is Llama-3-8B-shaped (hidden 4096, MLP 14336, 32/8 heads, vocab 128256) cut to
``--layers`` decoder layers, as in ``bench/train_step.py``; fastlora LoRA r=16 on every linear layer
of the decoder, AdamW, the same per-GPU batch (``--batch`` x ``--seq`` tokens) at every GPU count, so
the global batch grows with N (weak scaling). Arms, each for a bf16 and an NF4 (bitsandbytes,
double quantisation) base:

* ``single``      one process, no wrapper (run at N=1 only): the baseline
* ``ddp``         ``DistributedDataParallel``: base replicated, LoRA gradients all-reduced
* ``fsdp2-torch`` torch's ``fully_shard`` by hand, per decoder layer + root, as its docs show
  (an NF4 base stored as bf16 first: ``fastlora.quant.set_quant_storage``); everything sharded
* ``fsdp2``       ``fastlora.fully_shard(base="shard")``: blocks, input embeddings and LM head as
  separate units (the head kept gathered from forward to backward), explicit forward prefetch
* ``fsdp2-keep``  the same with ``reshard_after_forward=False``: one all-gather per block per step
* ``fsdp2-repl``  ``fastlora.fully_shard(base="replicate")``: the frozen base whole on every GPU,
  only LoRA sharded

Reported per arm and N: median step time (after warm-up), global tokens/s, tokens/s per GPU, scaling
efficiency ``tok/s(N) / (N * tok/s(1))`` against the same arm at N=1 and against ``single``, peak
GPU memory (max over ranks), and the first step's LoRA gradient norm (the same for every arm at a
given N: a correctness check of the wrappers).

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
``NVSHMEM_DISABLE_NVLS=1``): set here before torch.distributed starts and passed on to torchrun;
on the shared multi-GPU hosts a program using it can put the GPUs out of service.

    python bench/bench_distributed.py                       # N in {1, 2}: torchrun per N, table + JSON
    python bench/bench_distributed.py --gpus 1 2 4 --layers 4 --quant nf4 --arms ddp fsdp2
    torchrun --nproc-per-node 2 bench/bench_distributed.py --worker --out part.json   # one N by hand
    python bench/bench_distributed.py --smoke               # CPU + gloo, a tiny model: checks the plumbing
"""

from __future__ import annotations

import os

# Before anything can start NCCL / symmetric memory / NVSHMEM: NVLink multicast off, always.
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NVLINK_MULTICAST_OFF)

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import llama8b_config, quantize_linears  # noqa: E402

GIB = 1024**3
ARMS = ("single", "ddp", "fsdp2-torch", "fsdp2", "fsdp2-keep", "fsdp2-repl")
QUANTS = ("bf16", "nf4")


# -- model -------------------------------------------------------------------------------------------


def build(args, quant: str, device: torch.device) -> torch.nn.Module:
    """The patched model on ``device``, identical on every rank (same seed)."""
    from transformers import LlamaForCausalLM

    import fastlora

    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the final dtype: no fp32 copy of the base on the GPU
    try:
        with device:
            model = LlamaForCausalLM(llama8b_config(args.layers, tiny=args.smoke))
    finally:
        torch.set_default_dtype(old)
    if quant == "nf4":
        quantize_linears(model, device, compute_dtype=dtype)
    fastlora.patch(model, r=args.r, alpha=args.alpha)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


@functools.cache
def _mesh(device_type: str, world: int):
    """One mesh (one set of communicators) for every FSDP2 arm, not a new NCCL init per arm."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world,))


def wrap(model: torch.nn.Module, arm: str, device: torch.device) -> torch.nn.Module:
    import fastlora

    if arm == "single":
        return model
    if arm == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    mesh = _mesh(device.type, dist.get_world_size())
    if arm == "fsdp2-torch":
        from torch.distributed.fsdp import fully_shard

        from fastlora.quant import set_quant_storage

        set_quant_storage(model, torch.bfloat16)  # FSDP2 shards float parameters only (torch < 2.13)
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    options = {
        "fsdp2": dict(base="shard"),
        "fsdp2-keep": dict(base="shard", reshard_after_forward=False),
        "fsdp2-repl": dict(base="replicate"),
    }[arm]
    return fastlora.fully_shard(model, mesh=mesh, **options)


# -- one arm -----------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lora_grad_norm(model: torch.nn.Module) -> float:
    """The global L2 norm of the LoRA gradients (DTensor shards gathered: every rank calls this)."""
    total = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            total += g.double().pow(2).sum().cpu()
    return total.sqrt().item()


def run_arm(args, arm: str, quant: str, device: torch.device) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    t_arm = time.perf_counter()
    gc.collect()  # the previous arm's model (FSDP2 keeps reference cycles) must not count in this peak
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = wrap(build(args, quant, device), arm, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    vocab = llama8b_config(args.layers, tiny=args.smoke).vocab_size
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
    batches = [torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device) for _ in range(4)]

    losses, times, grad_norm = [], [], 0.0
    for i in range(args.warmup + args.iters):
        ids = batches[i % len(batches)]
        _sync(device)
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if i == 0:
            grad_norm = lora_grad_norm(model)  # before the first update; outside the timed steps
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.detach().float())
    if arm in args.profile and args.profile_out:
        profile(args, model, opt, batches, f"{arm} {quant} x{world}", device)
    # The slowest rank sets the pace: take each step's max over ranks, then the median.
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    peak = torch.tensor(
        [torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0], dtype=torch.float64, device=device
    )
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    loss_t = torch.stack(losses).to(device)
    dist.all_reduce(loss_t)
    loss_t /= world
    step_s = statistics.median(t.tolist())
    tokens = args.batch * args.seq * world
    del model, opt
    return {
        # The --smoke run (CPU) keeps dense bases in fp32: label it so.
        "arm": arm, "quant": "fp32" if quant == "bf16" and device.type == "cpu" else quant,
        "gpus": world, "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens / step_s, "tokens_per_s_per_gpu": tokens / step_s / world,
        "peak_gib": peak.item() / GIB, "first_loss": loss_t[0].item(), "last_loss": loss_t[-1].item(),
        "first_lora_grad_norm": grad_norm, "env": {k: os.environ.get(k) for k in NVLINK_MULTICAST_OFF},
        "arm_wall_s": time.perf_counter() - t_arm,
    }  # fmt: skip


def profile(args, model, opt, batches, label: str, device: torch.device, steps: int = 2) -> None:
    """Profile ``steps`` more steps on every rank; rank 0 appends where the device time goes to ``--profile-out``.

    Communication is the NCCL (or gloo) kernels' time; the rest is compute. Comparing their sum
    with the step time shows how much communication overlapped.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with torch_profile(activities=activities) as prof:
        for i in range(steps):
            ids = batches[i % len(batches)]
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
    wall_ms = 1e3 * (time.perf_counter() - t0) / steps
    if dist.get_rank() != 0:
        return
    events = prof.key_averages()

    def device_us(e) -> float:
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    # Device-side events only (kernels, memcpys): the CPU ops that launched them (aten::mm,
    # nccl:_all_gather_base, record_param_comms...) carry the same device time a second time.
    kernels = [e for e in events if e.device_type != DeviceType.CPU and device_us(e) > 0]
    comm = sum(device_us(e) for e in kernels if "nccl" in e.key.lower()) / 1e3 / steps
    total = sum(device_us(e) for e in kernels) / 1e3 / steps
    top = sorted(kernels, key=device_us, reverse=True)[:15]
    lines = [
        f"== {label}: step {wall_ms:.1f} ms wall (profiled), kernels {total:.1f} ms, of which NCCL {comm:.1f} ms "
        f"(including waits for the peer), compute {total - comm:.1f} ms; wall - compute {wall_ms - (total - comm):.1f} ms",
        *(f"   {device_us(e) / 1e3 / steps:8.2f} ms  x{e.count // steps:<5} {e.key[:110]}" for e in top),
    ]
    with open(args.profile_out, "a") as f:
        f.write("\n".join(lines) + "\n")


def worker(args) -> int:
    """One rank (under torchrun): every arm and quantisation for this world size."""
    if torch.cuda.is_available() and not args.smoke:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=10))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    world = dist.get_world_size()
    rows = []
    for quant in args.quant:
        for arm in args.arms:
            if arm == "single" and world != 1:
                continue
            try:
                row = run_arm(args, arm, quant, device)
            except Exception as exc:  # report the failing arm, keep the others (all ranks fail alike)
                traceback.print_exc()
                row = {"arm": arm, "quant": quant, "gpus": world, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            if dist.get_rank() == 0:
                print(json.dumps(row), flush=True)
            rows.append(row)
    if dist.get_rank() == 0 and args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    # Tear down together: a rank whose peer already closed its gloo connections can abort at exit
    # ("terminate called without an active exception", seen once in CI after every arm had finished).
    dist.barrier()
    dist.destroy_process_group()
    return 0


# -- driver ------------------------------------------------------------------------------------------


def add_efficiency(rows: list[dict]) -> None:
    """Scaling efficiency of each row vs the same arm at 1 GPU, and vs the unwrapped single process."""
    one = {(r["arm"], r["quant"]): r["tokens_per_s"] for r in rows if r.get("gpus") == 1 and "error" not in r}
    for r in rows:
        if "error" in r:
            continue
        n = r["gpus"]
        if (r["arm"], r["quant"]) in one:
            r["efficiency_vs_arm_1gpu"] = r["tokens_per_s"] / (n * one[r["arm"], r["quant"]])
        if ("single", r["quant"]) in one:
            r["efficiency_vs_single"] = r["tokens_per_s"] / (n * one["single", r["quant"]])


def table(rows: list[dict]) -> str:
    head = f"{'arm':<11} {'base':<5} {'GPUs':>4} {'step ms':>9} {'tok/s':>10} {'tok/s/GPU':>10} {'eff(arm)':>8} {'eff(1)':>7} {'peak GiB':>8} {'|grad|':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['arm']:<11} {r['quant']:<5} {r['gpus']:>4}  ERROR {r['error']}")
            continue
        ea, e1 = r.get("efficiency_vs_arm_1gpu"), r.get("efficiency_vs_single")
        lines.append(
            f"{r['arm']:<11} {r['quant']:<5} {r['gpus']:>4} {r['step_ms']:>9.1f} {r['tokens_per_s']:>10.0f} "
            f"{r['tokens_per_s_per_gpu']:>10.0f} {'' if ea is None else f'{ea:.0%}':>8} "
            f"{'' if e1 is None else f'{e1:.0%}':>7} {r['peak_gib']:>8.2f} {r['first_lora_grad_norm']:>10.4g}"
        )
    return "\n".join(lines)


def driver(args, passthrough: list[str]) -> int:
    if not args.smoke:
        have = torch.cuda.device_count()
        if max(args.gpus) > have:
            print(f"bench_distributed: --gpus {max(args.gpus)} needs that many GPUs; this machine has {have}")
            return 2
    env = dict(os.environ, **NVLINK_MULTICAST_OFF)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.gpus:
            part = Path(tmp) / f"gpus{n}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   str(Path(__file__).resolve()), "--worker", "--out", str(part), *passthrough]  # fmt: skip
            print(f"== {n} process(es): {' '.join(cmd[1:])}", flush=True)
            # cwd = this folder: never the repo root, whose kernels/ folder would shadow a package.
            proc = subprocess.run(cmd, env=env, cwd=Path(__file__).parent)
            if proc.returncode != 0 or not part.exists():
                rows.append({"arm": "*", "quant": "*", "gpus": n, "error": f"torchrun exited {proc.returncode}"})
                continue
            rows.extend(json.loads(part.read_text()))
    add_efficiency(rows)
    print(table(rows))
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "env": NVLINK_MULTICAST_OFF,
        # FASTLORA_BACKEND, if set, chooses the op's implementation: recorded with the numbers.
        "fastlora_env": {k: v for k, v in os.environ.items() if k.startswith("FASTLORA_")},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("worker", "out")},
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in rows) else 1


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="world sizes to run (driver)")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--quant", nargs="+", choices=QUANTS, default=list(QUANTS))
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=2, help="sequences per GPU")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    p.add_argument("--smoke", action="store_true", help="CPU + gloo, a tiny model, few steps")
    p.add_argument("--profile", nargs="*", default=[], choices=ARMS, help="arms to profile (2 extra steps each)")
    p.add_argument("--profile-out", default=None, help="text file the profiles are appended to")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "distributed.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in dict(layers=2, batch=2, seq=32, warmup=1, iters=2).items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    # What the driver passes on to each torchrun: every option but its own (--gpus, --json).
    raw = list(sys.argv[1:] if argv is None else argv)
    passthrough, skip = [], False
    for tok in raw:
        if skip:
            if tok.startswith("--"):
                skip = False
            else:
                continue
        if tok in ("--gpus", "--json"):
            skip = True
            continue
        if tok.startswith(("--gpus=", "--json=")):
            continue
        passthrough.append(tok)
    return args, passthrough


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse(argv)
    return worker(args) if args.worker else driver(args, passthrough)


if __name__ == "__main__":
    sys.exit(main())
