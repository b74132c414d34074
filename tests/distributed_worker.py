"""One rank of the 2-process ``torch.distributed`` runs of ``tests/test_distributed.py`` (gloo or NCCL).

The test launches this file twice (``python distributed_worker.py OUTDIR SCENARIO...``) with
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set, as torchrun would, and
``FASTLORA_DIST_DEVICE`` ``cpu`` (gloo; in CI) or ``cuda`` (NCCL, one GPU per rank). Each
scenario runs on both ranks and each rank saves what it saw to ``OUTDIR/<scenario>_rank<r>.pt``;
adapters are written to ``OUTDIR/<scenario>_adapter``. The test computes the single-process
references itself, with the helpers below (``build``, ``rank_ids``, ``train``...), so both sides
build the same model and data by construction and only the parallelism differs.

Each rank trains on its own batch; the reference trains one process on the union of the two
batches. Hugging Face's causal-LM loss is a mean over tokens, the ranks' batches have equal token
counts, and DDP and FSDP2 average gradients over ranks, so the two agree up to rounding.
"""

from __future__ import annotations

import os

# NVLink multicast stays off wherever NCCL may start (the shared multi-GPU hosts require it).
os.environ.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")

import datetime
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import fastlora
from fastlora._dist import is_dtensor, unwrap_ddp

WORLD = 2
R, ALPHA = 4, 8
STEPS = 4
LR = 0.3  # plain SGD: the reference comparison stays linear in the gradients (no Adam 0/eps noise)
SEQ = 16
VOCAB = 96  # helpers.tiny_llama's vocabulary
DEVICE = torch.device("cpu")  # this rank's device; main() sets cuda:LOCAL_RANK for NCCL runs


def build(kind: str, device: torch.device | str = "cpu", storage: torch.dtype = torch.uint8) -> nn.Module:
    """The tiny Llama of ``helpers.tiny_llama`` ("fp32", "bf16" or "nf4" base) on ``device``, patched, B ≠ 0.

    B is drawn non-zero so that A gets a gradient at the first step, which the gradient checks need.
    ``storage`` is bitsandbytes' ``quant_storage`` of an NF4 base (the same bytes whatever it is).
    """
    from helpers import quantize_model_bnb, tiny_llama

    model = tiny_llama(0)
    if kind == "bf16":
        model = model.to(torch.bfloat16)
    elif kind == "nf4":
        # blocksize 64: bnb's CPU dequant needs in % 64 == 0
        model = quantize_model_bnb(model, quant_storage=storage)
    elif kind != "fp32":
        raise ValueError(kind)
    model.to(device)  # a quantised Params4bit moves with its quant state
    fastlora.patch(model, r=R, alpha=ALPHA)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in fastlora.lora_layers(model).values():
            layer.lora_B.normal_(std=0.05)
    return model.train()


def rank_ids(rank: int) -> torch.Tensor:
    """Rank ``rank``'s batch of token ids, ``[2, SEQ]``."""
    gen = torch.Generator().manual_seed(1000 + rank)
    return torch.randint(0, VOCAB, (2, SEQ), generator=gen)


def union_ids() -> torch.Tensor:
    """All ranks' batches as one batch: what a single process trains on."""
    return torch.cat([rank_ids(r) for r in range(WORLD)])


def probe_ids() -> torch.Tensor:
    """Held-out ids on which trained models and PEFT-loaded adapters are compared."""
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(7))


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a plain or FSDP2-sharded one (an all-gather then: every rank calls it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def lora_state(model: nn.Module, what: str = "data") -> dict[str, torch.Tensor]:
    """``{"<layer>.lora_A": ..., "<layer>.lora_B": ...}``: values (``what="data"``) or gradients."""
    out = {}
    for name, layer in fastlora.lora_layers(unwrap_ddp(model)).items():
        for which in ("lora_A", "lora_B"):
            p = getattr(layer, which)
            t = p.grad if what == "grad" else p.detach()
            out[f"{name}.{which}"] = None if t is None else full(t).detach().cpu().clone()
    return out


def train(model: nn.Module, ids: torch.Tensor, steps: int = STEPS) -> tuple[dict[str, torch.Tensor], list[float]]:
    """SGD on ``ids`` for ``steps`` steps; returns the first step's LoRA gradients and the losses.

    Under torch.distributed the reported loss is the mean over ranks, i.e. the union batch's loss.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    ids = ids.to(params[0].device)
    opt = torch.optim.SGD(params, lr=LR)
    first: dict[str, torch.Tensor] = {}
    losses = []
    for step in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            first = lora_state(model, "grad")
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.detach().float()
        if dist.is_initialized():
            dist.all_reduce(value)
            value /= dist.get_world_size()
        losses.append(value.item())
    return first, losses


@torch.no_grad()
def probe_logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    ids = probe_ids().to(next(model.parameters()).device)
    logits = model(input_ids=ids).logits.float().cpu()
    model.train()
    return logits


def shard(model: nn.Module) -> None:
    """FSDP2 as its docs recommend: one unit per decoder layer, then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)


def record_compute_weights(model: nn.Module) -> dict[str, list[bool]]:
    """Hooks that check, at every LoraLinear forward, that the op gets whole, unsharded weights.

    The base weight the op receives (dense, or the 4-bit storage bitsandbytes packed) must equal the
    one taken before sharding, and A and B must be plain tensors of their full shapes.
    """
    from fastlora.quant import QuantizedWeight

    seen: dict[str, list[bool]] = {}
    for name, layer in fastlora.lora_layers(model).items():
        base = layer.base_weight()
        ref = base.packed.clone() if isinstance(base, QuantizedWeight) else base.detach().clone()
        shapes = (tuple(layer.lora_A.shape), tuple(layer.lora_B.shape))
        seen[name] = []

        def hook(mod: nn.Module, args: tuple, name: str = name, ref: torch.Tensor = ref, shapes=shapes) -> None:
            got = mod.base_weight()
            data = got.packed if isinstance(got, QuantizedWeight) else got
            ok = not is_dtensor(data) and data.shape == ref.shape and torch.equal(data, ref)
            ok = ok and not any(is_dtensor(p) for p in (mod.lora_A, mod.lora_B))
            ok = ok and (tuple(mod.lora_A.shape), tuple(mod.lora_B.shape)) == shapes
            seen[name].append(bool(ok))

        layer.register_forward_pre_hook(hook)
    return seen


def _error_of(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


# -- scenarios (run on every rank; return what this rank saw) -------------------------------------


def scenario_ddp(rank: int, out: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = build("fp32", DEVICE)
    ddp = DistributedDataParallel(model, device_ids=[DEVICE.index] if DEVICE.type == "cuda" else None)
    grads, losses = train(ddp, rank_ids(rank))
    fastlora.save_adapter(ddp, out / "ddp_adapter")  # the wrapper itself: save_adapter unwraps it
    return dict(grads=grads, losses=losses, params=lora_state(model), logits=probe_logits(model))


def nonfloat_sharded(model: nn.Module) -> list[str]:
    """The parameters FSDP2 manages that are not floating point.

    torch < 2.13 creates each sharded parameter as ``nn.Parameter(shard)`` (``requires_grad=True``)
    before setting its real flag, so ``fully_shard`` raises "only Tensors of floating point dtype can
    require gradients" on any such parameter (pytorch#177844); newer torch (this CI's) accepts
    frozen ones. Listing them here makes the CPU run fail where an older torch would crash.
    """
    return [n for n, p in model.named_parameters() if is_dtensor(p) and not p.is_floating_point()]


def _fsdp(
    rank: int, out: Path, kind: str, tag: str, *, storage=torch.uint8, other_init: bool = False, **fastlora_shard
) -> dict:
    """``fastlora_shard`` given: ``fastlora.fully_shard(model, **fastlora_shard)``; else torch's by hand.

    ``other_init``: rank 1 draws its LoRA weights with another seed (fully_shard must make them rank 0's).
    """
    model = build(kind, DEVICE, storage)
    if other_init and rank == 1:
        with torch.no_grad():
            for layer in fastlora.lora_layers(model).values():
                layer.lora_A.normal_()
                layer.lora_B.normal_()
    seen = record_compute_weights(model)
    if fastlora_shard:
        fastlora.fully_shard(model, **fastlora_shard)
    else:
        shard(model)
    layers = fastlora.lora_layers(model)
    sharded = {name: (is_dtensor(m.base_layer.weight), is_dtensor(m.lora_A)) for name, m in layers.items()}
    nonfloat = nonfloat_sharded(model)
    grads, losses = train(model, rank_ids(rank))
    some = next(iter(layers.values()))
    error = _error_of(lambda: some.dense_base_weight(torch.float32))
    embed_sharded = is_dtensor(model.model.embed_tokens.weight)  # after the steps: kept whole or not
    fastlora.save_adapter(model, out / f"{tag}_adapter")  # on every rank: it all-gathers A and B
    return dict(
        grads=grads, losses=losses, params=lora_state(model), logits=probe_logits(model),
        seen=seen, sharded=sharded, merge_error=error, nonfloat_sharded=nonfloat, embed_sharded=embed_sharded,
    )  # fmt: skip


def scenario_fsdp_fp32(rank: int, out: Path) -> dict:
    return _fsdp(rank, out, "fp32", "fsdp_fp32")


def scenario_fsdp_bf16(rank: int, out: Path) -> dict:
    # fastlora's helper, gathered weights kept from forward to backward.
    return _fsdp(rank, out, "bf16", "fsdp_bf16", base="shard", reshard_after_forward=False)


def scenario_fsdp_fp32_grouped(rank: int, out: Path) -> dict:
    # Both blocks one unit (a grouped fully_shard), two units of prefetch each way, embeddings kept.
    return _fsdp(
        rank, out, "fp32", "fsdp_fp32_grouped", blocks_per_unit=2, prefetch=2, backward_prefetch=2, keep_embeddings=True
    )


def scenario_fsdp_fp32_replicated_lora(rank: int, out: Path) -> dict:
    # The base sharded, LoRA whole on every rank with its gradients all-reduced after backward.
    # Rank 1 starts from other LoRA weights: fully_shard broadcasts rank 0's, as DDP does.
    return _fsdp(rank, out, "fp32", "fsdp_fp32_replicated_lora", lora="replicate", other_init=True)


def scenario_fsdp_nf4(rank: int, out: Path) -> dict:
    # The QLoRA+FSDP recipe with torch's fully_shard by hand: bitsandbytes quantises into fp32 storage.
    return _fsdp(rank, out, "nf4", "fsdp_nf4", storage=torch.float32)


def scenario_fsdp_nf4_helper(rank: int, out: Path) -> dict:
    # A model quantised the default way (uint8 storage): fastlora.fully_shard re-stores it as bf16.
    return _fsdp(rank, out, "nf4", "fsdp_nf4_helper", base="shard")


def scenario_fsdp_nf4_replicated(rank: int, out: Path) -> dict:
    # The frozen base stays whole on every rank (FSDP2 ignored_params); only LoRA shards.
    return _fsdp(rank, out, "nf4", "fsdp_nf4_replicated", base="replicate")


def scenario_fsdp_nf4_one_unit_replicated(rank: int, out: Path) -> dict:
    # Replicated base, every LoRA parameter in one unit gathered once per step.
    return _fsdp(
        rank, out, "nf4", "fsdp_nf4_one_unit_replicated", base="replicate", blocks_per_unit=None,
        reshard_after_forward=False,
    )  # fmt: skip


def lora_ga_batches(ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """One batch per sequence, as ``fastlora.estimate_gradient`` takes them."""
    return [dict(input_ids=row[None], labels=row[None]) for row in ids]


def lora_ga_result(model: nn.Module) -> dict[str, torch.Tensor]:
    """A, B and the (offset) base weight of every layer after a LoRA-GA init."""
    state = lora_state(model)
    for name, layer in fastlora.lora_layers(model).items():
        state[f"{name}.base"] = layer.base_layer.weight.detach().cpu().clone()
    return state


def scenario_lora_ga(rank: int, out: Path) -> dict:
    from helpers import tiny_llama

    model = tiny_llama(0).to(DEVICE)
    data = lora_ga_batches(rank_ids(rank))
    fastlora.patch(model, method="lora_ga", r=R, alpha=ALPHA, data=data, iters=len(data), progress=False)
    return dict(init=lora_ga_result(model))


def scenario_selftest_ok(rank: int, out: Path) -> dict:
    return dict(rank=rank)


scenario_selftest_ok2 = scenario_selftest_ok


def scenario_selftest_crash(rank: int, out: Path) -> dict:
    """Rank 1 raises while rank 0 waits in a collective: the harness must pin it on this scenario."""
    if rank == 1:
        raise RuntimeError("selftest: rank 1 fails here")
    dist.barrier()
    return {}


SCENARIOS: dict[str, Callable[[int, Path], dict]] = {
    name[len("scenario_") :]: fn for name, fn in globals().items() if name.startswith("scenario_")
}


BEGIN = "[distributed_worker] begin scenario "


def main(argv: list[str]) -> int:
    """Run the scenarios in order; each rank saves ``<scenario>_rank<r>.pt`` when one is done.

    The parent (tests/test_distributed.py) attributes a crash to the first scenario without results
    (its log section starts at the ``BEGIN`` line) and runs the rest in a fresh pair of processes.
    """
    out, names = Path(argv[0]), argv[1:]
    global DEVICE
    timeout = datetime.timedelta(seconds=120)
    if os.environ.get("FASTLORA_DIST_DEVICE", "cpu") == "cuda":
        DEVICE = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(DEVICE)
        dist.init_process_group("nccl", device_id=DEVICE, timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    try:
        for name in names:
            print(BEGIN + name, flush=True)
            result = SCENARIOS[name](rank, out)
            part = out / f"{name}_rank{rank}.pt.part"
            torch.save(result, part)
            part.rename(out / f"{name}_rank{rank}.pt")  # whole or absent: the parent polls for it
            dist.barrier()
    except Exception:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # do not wait in destroy_process_group for a peer stuck in a collective
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
