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
* ``fsdp2*``       ``fastlora.fully_shard`` layouts (``ARMS`` below lists each one's options): the
  default (blocks, input embeddings and LM head as units, the head kept gathered from forward to
  backward, one unit of forward prefetch), ``-keep`` (``reshard_after_forward=False``), ``-gK`` (K
  blocks per unit), ``-emb`` (``keep_embeddings``), ``-bwd2`` (two units of forward and backward
  prefetch), ``-mp`` (LoRA gathered as bf16, gradients reduced in fp32), ``-rs16`` (LoRA gradients
  reduced in bf16), ``-cta`` (an NCCL group whose collectives use at most 8 CTAs, i.e. SMs),
  ``-repl`` (``base="replicate"``: only LoRA sharded; ``-repl-1``: all of it one unit), ``-lrepl``
  (``lora="replicate"``: only the frozen base sharded, LoRA gradients all-reduced after backward)

Reported per arm and N: median step time (after warm-up), the median host time to enqueue a step
(``host_ms``: when it nears the step time, the CPU is the bottleneck), global tokens/s, tokens/s per GPU, scaling
efficiency ``tok/s(N) / (N * tok/s(1))`` against the same arm at N=1 and against ``single``, peak
GPU memory (max over ranks), and the first step's LoRA gradient norm (the same for every arm at a
given N up to summation order, and within bf16 rounding for ``-mp``/``-rs16``: a correctness check
of the wrappers, flagged in the table).

NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
``NVSHMEM_DISABLE_NVLS=1``): set here before torch.distributed starts and passed on to torchrun;
on the shared multi-GPU hosts a program using it can put the GPUs out of service.

    python bench/bench_distributed.py                       # N in {1, 2}: torchrun per N, table + JSON
    python bench/bench_distributed.py --gpus 1 2 4 --layers 4 --quant nf4 --arms ddp fsdp2
    torchrun --nproc-per-node 2 bench/bench_distributed.py --worker --out part.json   # one N by hand
    python bench/bench_distributed.py --smoke               # CPU + gloo, a tiny model: checks the plumbing
    python bench/bench_distributed.py --budget-s 300 --profile-best --profile-out prof.txt   # see --help
"""

from __future__ import annotations

import os

# Before anything can start NCCL / symmetric memory / NVSHMEM: NVLink multicast off, always.
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
os.environ.update(NVLINK_MULTICAST_OFF)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
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
QUANTS = ("bf16", "nf4")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One way of running the step. ``shard``: ``fastlora.fully_shard`` options (``wrap="fastlora"``)."""

    wrap: str  # "none", "ddp", "torch" (fully_shard by hand) or "fastlora"
    shard: dict = dataclasses.field(default_factory=dict)
    mp: tuple[str, str] | None = None  # MixedPrecisionPolicy (param_dtype, reduce_dtype) names
    max_ctas: int | None = None  # NCCL group whose collectives use at most this many CTAs (SMs)
    exact: bool = True  # the first LoRA gradient equals the other arms' up to summation order


ARMS: dict[str, Arm] = {
    "single": Arm("none"),
    "ddp": Arm("ddp"),
    "fsdp2-torch": Arm("torch"),
    "fsdp2": Arm("fastlora"),
    "fsdp2-keep": Arm("fastlora", dict(reshard_after_forward=False)),
    "fsdp2-repl": Arm("fastlora", dict(base="replicate")),
    "fsdp2-g2": Arm("fastlora", dict(blocks_per_unit=2)),
    "fsdp2-emb": Arm("fastlora", dict(keep_embeddings=True)),
    "fsdp2-g2-emb": Arm("fastlora", dict(blocks_per_unit=2, keep_embeddings=True)),
    "fsdp2-keep-g2": Arm("fastlora", dict(reshard_after_forward=False, blocks_per_unit=2)),
    "fsdp2-keep-g4": Arm("fastlora", dict(reshard_after_forward=False, blocks_per_unit=4)),
    "fsdp2-keep-emb": Arm("fastlora", dict(reshard_after_forward=False, keep_embeddings=True)),
    "fsdp2-keep-cta": Arm("fastlora", dict(reshard_after_forward=False), max_ctas=8),
    "fsdp2-keep-g2-emb-cta": Arm(
        "fastlora", dict(reshard_after_forward=False, blocks_per_unit=2, keep_embeddings=True), max_ctas=8
    ),
    "fsdp2-keep-mp": Arm("fastlora", dict(reshard_after_forward=False), mp=("bfloat16", "float32"), exact=False),
    "fsdp2-keep-rs16": Arm("fastlora", dict(reshard_after_forward=False), mp=("", "bfloat16"), exact=False),
    "fsdp2-bwd2": Arm("fastlora", dict(prefetch=2, backward_prefetch=2)),
    "fsdp2-lrepl": Arm("fastlora", dict(lora="replicate")),
    "fsdp2-keep-lrepl": Arm("fastlora", dict(reshard_after_forward=False, lora="replicate")),
    "fsdp2-g2-emb-lrepl": Arm("fastlora", dict(blocks_per_unit=2, keep_embeddings=True, lora="replicate")),
    "fsdp2-keep-g2-emb-lrepl-cta": Arm(
        "fastlora",
        dict(reshard_after_forward=False, blocks_per_unit=2, keep_embeddings=True, lora="replicate"),
        max_ctas=8,
    ),
    "fsdp2-repl-1": Arm("fastlora", dict(base="replicate", blocks_per_unit=None, reshard_after_forward=False)),
}
# The first six: the arms of the first H200 runs (the default selection).
DEFAULT_ARMS = ["single", "ddp", "fsdp2-torch", "fsdp2", "fsdp2-keep", "fsdp2-repl"]
# Relative spread of the first LoRA gradient norm tolerated across arms at one N (exact arms: the
# kernels' own run-to-run variation; bf16 gradients or reductions: bf16 rounding).
GRAD_RTOL = {True: 1e-3, False: 2e-2}
# Seconds of --deadline kept for the --profile-best re-runs (2 arms with 2 profiled steps each).
PROFILE_RESERVE_S = 30


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
def _mesh(device_type: str, world: int, max_ctas: int | None = None):
    """One mesh (one set of communicators) per kind, reused by every FSDP2 arm, not a new NCCL init per arm.

    ``max_ctas``: a new NCCL group whose communicators launch at most that many CTAs per collective
    (NCCL's ``maxCTAs``), i.e. leave the other SMs to the GEMMs they overlap. Only for NCCL: gloo
    runs on host threads, so on the CPU the plain mesh is returned.
    """
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    if max_ctas is None or device_type != "cuda":
        return init_device_mesh(device_type, (world,))
    opts = dist.ProcessGroupNCCL.Options()
    opts.config.max_ctas = max_ctas
    group = dist.new_group(list(range(world)), backend="nccl", pg_options=opts)
    return DeviceMesh.from_group(group, device_type)


def wrap(model: torch.nn.Module, arm: str, device: torch.device) -> torch.nn.Module:
    import fastlora

    spec = ARMS[arm]
    if spec.wrap == "none":
        return model
    if spec.wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    mesh = _mesh(device.type, dist.get_world_size(), spec.max_ctas)
    if spec.wrap == "torch":
        from torch.distributed.fsdp import fully_shard

        from fastlora.quant import set_quant_storage

        set_quant_storage(model, torch.bfloat16)  # FSDP2 shards float parameters only (torch < 2.13)
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    options = dict(spec.shard)
    if spec.mp is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        param, reduce = (getattr(torch, name) if name else None for name in spec.mp)
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)
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


def run_arm(args, arm: str, quant: str, device: torch.device, profile_label: str | None = None) -> dict:
    """Time ``arm`` on a fresh model; with ``profile_label``, profile 2 more steps into ``--profile-out``."""
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

    losses, times, host, grad_norm = [], [], [], 0.0
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
        t_host = time.perf_counter()  # everything is enqueued: the host's share of the step
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            host.append(t_host - t0)
        losses.append(loss.detach().float())
    if profile_label is not None:
        profile(args, model, opt, batches, profile_label, device)
    # The slowest rank sets the pace: take each step's max over ranks, then the median.
    t = torch.tensor([times, host], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    peak = torch.tensor(
        [torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0], dtype=torch.float64, device=device
    )
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    loss_t = torch.stack(losses).to(device)
    dist.all_reduce(loss_t)
    loss_t /= world
    step_s = statistics.median(t[0].tolist())
    tokens = args.batch * args.seq * world
    del model, opt
    return {
        # The --smoke run (CPU) keeps dense bases in fp32: label it so.
        "arm": arm, "quant": "fp32" if quant == "bf16" and device.type == "cpu" else quant,
        "gpus": world, "step_ms": 1e3 * step_s, "host_ms": 1e3 * statistics.median(t[1].tolist()),
        "tokens_per_s": tokens / step_s, "tokens_per_s_per_gpu": tokens / step_s / world,
        "peak_gib": peak.item() / GIB, "first_loss": loss_t[0].item(), "last_loss": loss_t[-1].item(),
        "first_lora_grad_norm": grad_norm, "env": {k: os.environ.get(k) for k in NVLINK_MULTICAST_OFF},
        "arm_wall_s": time.perf_counter() - t_arm,
    }  # fmt: skip


def _union_ms(spans: list[tuple[float, float]]) -> float:
    """Total length (ms) of the union of ``(start_us, end_us)`` intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e3


def profile_summary(prof, label: str, wall_ms: float, steps: int) -> list[str]:
    """Where a profiled step's time went, as a few tables (per step; ms).

    * streams: busy time of each device stream (union of its kernels' intervals) and the compute
      stream's idle time (wall minus busy: waits for all-gathers/reduce-scatters and for the host);
    * kernels: the 12 costliest device kernels (NCCL kernel time includes waiting for the peer);
    * FSDP host work: CPU time inside torch's ``FSDP::*`` profiler ranges, by kind (nested ranges,
      e.g. ``all_gather`` inside ``pre_forward``, are counted in both).
    """
    from torch.autograd import DeviceType

    def device_us(e) -> float:
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    lines = [f"== {label}: step {wall_ms:.1f} ms wall (profiled; the profiler adds host time per op)"]
    events = list(prof.events())
    # Device activity (kernels, copies), not the GPU projections of record_function ranges.
    kernels = [
        e
        for e in events
        if e.device_type != DeviceType.CPU
        and not getattr(e, "is_user_annotation", False)
        and e.time_range.end > e.time_range.start
    ]
    if kernels:
        streams: dict[object, list] = {}
        for e in kernels:
            streams.setdefault(getattr(e, "device_resource_id", None), []).append(e)

        def gemm_us(evs) -> float:
            return sum(e.time_range.elapsed_us() for e in evs if "nccl" not in e.name.lower())

        compute = max(streams, key=lambda k: gemm_us(streams[k]))
        lines.append(f"   {'stream':>8} {'busy ms':>8} {'kernels':>8}  what")
        for sid, evs in sorted(streams.items(), key=lambda kv: -sum(e.time_range.elapsed_us() for e in kv[1])):
            busy = _union_ms([(e.time_range.start, e.time_range.end) for e in evs]) / steps
            nccl = sum("nccl" in e.name.lower() for e in evs)
            what = "compute" if sid == compute else ("NCCL" if nccl == len(evs) else f"{nccl} NCCL + copies")
            lines.append(f"   {sid!s:>8} {busy:>8.2f} {len(evs) // steps:>8}  {what}")
        spans = [(e.time_range.start, e.time_range.end) for e in streams[compute]]
        nccl_spans = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" in e.name.lower()]
        busy = _union_ms(spans) / steps
        # Compute time with an NCCL kernel running beside it: where the SMs and HBM are shared.
        shared = (_union_ms(spans) + _union_ms(nccl_spans) - _union_ms(spans + nccl_spans)) / steps
        copy_out = sum(e.time_range.elapsed_us() for e in streams[compute] if "split_with_sizes" in e.name) / 1e3
        lines.append(
            f"   compute stream idle {wall_ms - busy:.1f} ms of {wall_ms:.1f} (waits for collectives or the host); "
            f"busy beside NCCL kernels {shared:.1f} ms; FSDP2 copy-out on it {copy_out / steps:.2f} ms"
        )
    else:
        lines.append("   (no device events: CPU run)")
    top = sorted(
        (
            e
            for e in prof.key_averages()
            if e.device_type != DeviceType.CPU and not getattr(e, "is_user_annotation", False) and device_us(e) > 0
        ),
        key=device_us,
        reverse=True,
    )[:12]
    lines += [f"   {device_us(e) / 1e3 / steps:8.2f} ms  x{e.count // steps:<5} {e.key[:100]}" for e in top]
    fsdp: dict[str, list[float]] = {}
    for e in events:
        if e.device_type == DeviceType.CPU and e.name.startswith("FSDP::"):
            kind = e.name.split(" ")[0]
            acc = fsdp.setdefault(kind, [0, 0.0])
            acc[0] += 1
            acc[1] += e.cpu_time_total / 1e3
    if fsdp:
        lines.append(f"   FSDP host work per step: {'range':<40} {'calls':>6} {'CPU ms':>8}")
        for kind, (n, ms) in sorted(fsdp.items(), key=lambda kv: -kv[1][1]):
            lines.append(f"   {'':<24} {kind:<40} {n // steps:>6} {ms / steps:>8.2f}")
    return lines


def profile(args, model, opt, batches, label: str, device: torch.device, steps: int = 2) -> None:
    """Profile ``steps`` more steps on every rank; rank 0 appends :func:`profile_summary` to ``--profile-out``."""
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
    try:
        lines = profile_summary(prof, label, wall_ms, steps)
    except Exception as exc:  # a summary that fails must not cost the timing rows
        lines = [f"== {label}: profile summary failed: {type(exc).__name__}: {exc}"]
    with open(args.profile_out, "a") as f:
        f.write("\n".join(lines) + "\n")


class Deadline:
    """Skips arms that would not finish before ``--deadline`` (epoch seconds); every rank decides alike."""

    def __init__(self, deadline: float | None, device: torch.device) -> None:
        self.deadline, self.device = deadline, device
        self.longest = 0.0  # the longest arm so far: the estimate for the next one

    def allows(self) -> bool:
        if self.deadline is None:
            return True
        late = torch.tensor([float(time.time() + self.longest * 1.2 > self.deadline)], device=self.device)
        dist.all_reduce(late, op=dist.ReduceOp.MAX)  # rank 0's clock alone could split the ranks
        return late.item() == 0.0

    def took(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)


def _run_or_error(args, arm, quant, device, world, deadline: Deadline, profile_label=None) -> dict:
    if not deadline.allows():
        return {"arm": arm, "quant": quant, "gpus": world, "error": "not run: --deadline reached"}
    t0 = time.perf_counter()
    try:
        row = run_arm(args, arm, quant, device, profile_label)
    except Exception as exc:  # report the failing arm, keep the others (all ranks fail alike)
        traceback.print_exc()
        row = {"arm": arm, "quant": quant, "gpus": world, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    deadline.took(time.perf_counter() - t0)
    return row


def worker(args) -> int:
    """One rank (under torchrun): every arm and quantisation for this world size.

    Arms run in the order given, each for every ``--quant`` (so a deadline cuts the last arms, not a
    whole base); rank 0 rewrites ``--out`` after each one, so a run killed from outside keeps its rows.
    """
    if torch.cuda.is_available() and not args.smoke:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=10))
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    world, rank = dist.get_world_size(), dist.get_rank()
    profiling = args.profile_out and world in args.profile_gpus
    best_later = bool(profiling and args.profile_best and world > 1)
    final = Deadline(args.deadline, device)
    # The timed arms leave PROFILE_RESERVE_S for the profiled re-runs of the best layouts.
    deadline = Deadline(None if args.deadline is None else args.deadline - PROFILE_RESERVE_S * best_later, device)
    arms = args.arms if world > 1 or args.one_gpu_arms is None else args.one_gpu_arms
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        if rank == 0:
            print(json.dumps(row), flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")

    for arm in arms:
        if ARMS[arm].wrap == "none" and world != 1:
            continue
        for quant in args.quant:
            label = f"{arm} {quant} x{world}" if profiling and arm in args.profile else None
            emit(_run_or_error(args, arm, quant, device, world, deadline, label))
    if best_later:
        final.took(deadline.longest)
        # The fastest fastlora.fully_shard layout per base (step times are max-reduced: the same on every rank).
        for quant in args.quant:
            label_quant = "fp32" if quant == "bf16" and device.type == "cpu" else quant
            ok = [
                r for r in rows if r["quant"] == label_quant and "error" not in r and ARMS[r["arm"]].wrap == "fastlora"
            ]
            if not ok:
                continue
            best = min(ok, key=lambda r: r["step_ms"])["arm"]
            if best in args.profile:
                continue  # profiled already
            row = _run_or_error(args, best, quant, device, world, final, f"{best} {quant} x{world} (best)")
            row["profile_rerun"] = True  # a second timing of an arm above, not a new arm
            emit(row)
    # Tear down together: a rank whose peer already closed its gloo connections can abort at exit
    # ("terminate called without an active exception", seen once in CI after every arm had finished).
    dist.barrier()
    dist.destroy_process_group()
    return 0


# -- driver ------------------------------------------------------------------------------------------


def add_efficiency(rows: list[dict]) -> None:
    """Scaling efficiency of each row vs the same arm at 1 GPU, and vs the unwrapped single process."""
    one = {
        (r["arm"], r["quant"]): r["tokens_per_s"]
        for r in rows
        if r.get("gpus") == 1 and "error" not in r and not r.get("profile_rerun")
    }
    for r in rows:
        if "error" in r:
            continue
        n = r["gpus"]
        if (r["arm"], r["quant"]) in one:
            r["efficiency_vs_arm_1gpu"] = r["tokens_per_s"] / (n * one[r["arm"], r["quant"]])
        if ("single", r["quant"]) in one:
            r["efficiency_vs_single"] = r["tokens_per_s"] / (n * one["single", r["quant"]])


def check_grad_norms(rows: list[dict]) -> list[str]:
    """Flag (``grad_norm_ok``) rows whose first LoRA gradient norm strays from the exact arms' median at their N."""
    notes = []
    keys = {(r["quant"], r["gpus"]) for r in rows if "error" not in r and r["arm"] in ARMS}
    for quant, n in sorted(keys, key=str):
        group = [r for r in rows if "error" not in r and r["arm"] in ARMS and (r["quant"], r["gpus"]) == (quant, n)]
        exact = [r["first_lora_grad_norm"] for r in group if ARMS[r["arm"]].exact] or [
            r["first_lora_grad_norm"] for r in group
        ]
        ref = statistics.median(exact)
        worst = 0.0
        for r in group:
            rel = abs(r["first_lora_grad_norm"] - ref) / max(abs(ref), 1e-30)
            r["grad_norm_ok"] = rel <= GRAD_RTOL[ARMS[r["arm"]].exact]
            worst = max(worst, rel)
        bad = [r["arm"] for r in group if not r["grad_norm_ok"]]
        notes.append(
            f"first LoRA gradient norm, {quant} x{n}: median of exact arms {ref:.6g}, largest relative deviation "
            f"{worst:.1e}" + (f"; OUT OF TOLERANCE: {', '.join(bad)}" if bad else "")
        )
    return notes


# Candidate defaults of fastlora.fully_shard: the option and the arm that has it on top of `fsdp2`.
DEFAULT_CANDIDATES = {
    "blocks_per_unit=2": "fsdp2-g2",
    "keep_embeddings=True": "fsdp2-emb",
    "blocks_per_unit=2 + keep_embeddings=True": "fsdp2-g2-emb",
    'lora="replicate"': "fsdp2-lrepl",
}


def summarize(rows: list[dict], gpus: int = 2, target: float = 0.85) -> list[str]:
    """The fastest fastlora.fully_shard layouts at ``gpus`` against the target, and the defaults rule.

    Rule (bench/NOTES.md): an option becomes a default when its arm beats ``fsdp2`` (the current
    defaults) by >= 2 % on every base measured, at <= 1 GiB more peak memory per GPU.
    """
    ok = [r for r in rows if "error" not in r and r["gpus"] == gpus and not r.get("profile_rerun")]
    lines = []
    quants = sorted({r["quant"] for r in ok})
    for quant in quants:
        mine = sorted((r for r in ok if r["quant"] == quant and ARMS[r["arm"]].wrap == "fastlora"),
                      key=lambda r: -r["tokens_per_s"])  # fmt: skip
        for label, pool in (("sharded base", [r for r in mine if ARMS[r["arm"]].shard.get("base") != "replicate"]),
                            ("any base", mine)):  # fmt: skip
            if pool and pool[0].get("efficiency_vs_single") is not None:
                best = pool[0]
                eff = best["efficiency_vs_single"]
                lines.append(
                    f"best fastlora.fully_shard layout ({label}), {quant} x{gpus}: {best['arm']} "
                    f"{eff:.1%} of {gpus} x single ({'meets' if eff >= target else 'misses'} {target:.0%}), "
                    f"peak {best['peak_gib']:.2f} GiB"
                )
    by = {(r["arm"], r["quant"]): r for r in ok}
    for option, arm in DEFAULT_CANDIDATES.items():
        pairs = [(by.get((arm, q)), by.get(("fsdp2", q))) for q in quants]
        if not pairs or any(a is None or b is None for a, b in pairs):
            lines.append(f"default {option}: not decided ({arm} or fsdp2 missing)")
            continue
        gains = [a["tokens_per_s"] / b["tokens_per_s"] - 1 for a, b in pairs]
        extra = max(a["peak_gib"] - b["peak_gib"] for a, b in pairs)
        adopt = min(gains) >= 0.02 and extra <= 1.0
        lines.append(
            f"default {option}: {'ADOPT' if adopt else 'keep off'} ({arm} vs fsdp2: "
            + ", ".join(f"{q} {g:+.1%}" for q, g in zip(quants, gains))
            + f"; peak {extra:+.2f} GiB)"
        )
    return lines


def table(rows: list[dict]) -> str:
    head = (
        f"{'arm':<27} {'base':<5} {'GPUs':>4} {'step ms':>8} {'host ms':>8} {'tok/s':>9} {'tok/s/GPU':>9} "
        f"{'eff(arm)':>8} {'eff(1)':>7} {'peak GiB':>8} {'|grad|':>10}"
    )
    lines = [head, "-" * len(head)]
    order = {name: i for i, name in enumerate(ARMS)}
    for r in sorted(rows, key=lambda r: (str(r["quant"]), r["gpus"], order.get(r["arm"], -1))):
        if "error" in r:
            lines.append(f"{r['arm']:<27} {r['quant']:<5} {r['gpus']:>4}  ERROR {r['error']}")
            continue
        ea, e1 = r.get("efficiency_vs_arm_1gpu"), r.get("efficiency_vs_single")
        flag = "" if r.get("grad_norm_ok", True) else " !"
        name = r["arm"] + (" (re-run)" if r.get("profile_rerun") else "")
        lines.append(
            f"{name:<27} {r['quant']:<5} {r['gpus']:>4} {r['step_ms']:>8.1f} {r.get('host_ms', float('nan')):>8.1f} "
            f"{r['tokens_per_s']:>9.0f} {r['tokens_per_s_per_gpu']:>9.0f} {'' if ea is None else f'{ea:.0%}':>8} "
            f"{'' if e1 is None else f'{e1:.0%}':>7} {r['peak_gib']:>8.2f} {r['first_lora_grad_norm']:>10.4g}{flag}"
        )
    return "\n".join(lines)


def write_report(args, rows: list[dict], t_start: float, final: bool) -> None:
    """Efficiencies, gradient check and ``--json`` for the rows so far (the table too when ``final``)."""
    add_efficiency(rows)
    notes = check_grad_norms(rows)
    summary = summarize(rows)
    if final:
        print(table(rows))
        print("\n".join(notes + summary))
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": "cpu (smoke)" if args.smoke else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "env": NVLINK_MULTICAST_OFF,
        # FASTLORA_BACKEND, if set, chooses the op's implementation: recorded with the numbers.
        "fastlora_env": {k: v for k, v in os.environ.items() if k.startswith("FASTLORA_")},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("worker", "out")},
        "arms": {name: dataclasses.asdict(spec) for name, spec in ARMS.items()},
        "grad_norm_check": notes,
        "summary": summary,
        "wall_s": time.time() - t_start,
        "complete": final,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        if final:
            print(f"wrote {args.json}")


def driver(args, passthrough: list[str]) -> int:
    t_start = time.time()
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
            extra = [] if args.budget_s is None else ["--deadline", str(t_start + args.budget_s)]
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                   str(Path(__file__).resolve()), "--worker", "--out", str(part), *passthrough, *extra]  # fmt: skip
            print(f"== {n} process(es): {' '.join(cmd[1:])}", flush=True)
            # cwd = this folder: never the repo root, whose kernels/ folder would shadow a package.
            proc = subprocess.run(cmd, env=env, cwd=Path(__file__).parent)
            if part.exists():  # what the ranks finished, even if the run died later
                rows.extend(json.loads(part.read_text()))
            if proc.returncode != 0:
                rows.append({"arm": "*", "quant": "*", "gpus": n, "error": f"torchrun exited {proc.returncode}"})
            write_report(args, rows, t_start, final=False)  # a run stopped from outside keeps what is done
    write_report(args, rows, t_start, final=True)
    ok = all("error" not in r for r in rows) and all(r.get("grad_norm_ok", True) for r in rows)
    return 0 if ok else 1


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = list(ARMS)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="world sizes to run (driver)")
    p.add_argument("--arms", nargs="+", choices=names, default=DEFAULT_ARMS, help="arms, in the order to run")
    p.add_argument("--one-gpu-arms", nargs="+", choices=names, default=None,
                   help="arms at N=1 (default: --arms); e.g. only the baselines")  # fmt: skip
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
    p.add_argument("--profile", nargs="*", default=[], choices=names, help="arms to profile (2 extra steps each)")
    p.add_argument("--profile-gpus", type=int, nargs="+", default=[1, 2, 4, 8], help="world sizes that profile")
    p.add_argument("--profile-best", action="store_true",
                   help="at N>1, re-run the fastest fastlora.fully_shard arm per base with the profiler")  # fmt: skip
    p.add_argument("--profile-out", default=None, help="text file the profile summaries are appended to")
    p.add_argument("--budget-s", type=float, default=None,
                   help="wall-clock budget of the whole driver run: arms that would end past it are skipped")  # fmt: skip
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "distributed.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        for k, v in dict(layers=2, batch=2, seq=32, warmup=1, iters=2).items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    # What the driver passes on to each torchrun: every option but its own (--gpus, --json, --budget-s).
    own = ("--gpus", "--json", "--budget-s")
    raw = list(sys.argv[1:] if argv is None else argv)
    passthrough, skip = [], False
    for tok in raw:
        if skip:
            if tok.startswith("--"):
                skip = False
            else:
                continue
        if tok in own:
            skip = True
            continue
        if tok.startswith(tuple(f"{o}=" for o in own)):
            continue
        passthrough.append(tok)
    return args, passthrough


def main(argv: list[str] | None = None) -> int:
    args, passthrough = parse(argv)
    return worker(args) if args.worker else driver(args, passthrough)


def _exit_worker(rc: int) -> None:
    """End a torchrun rank without the interpreter's teardown. A gloo rank still aborted at exit after
    the barrier and ``destroy_process_group`` ("terminate called without an active exception": a
    C++ thread destroyed while joinable during static destruction), once in CI after every arm had
    finished and its results were written, failing the whole run; everything is flushed, so skipping
    the destructors loses nothing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    rc = main()
    if "--worker" in sys.argv[1:]:
        _exit_worker(rc)
    sys.exit(rc)
