"""The model every GPU benchmark uses: a Llama-3-8B-shaped config cut to L layers, and its NF4 copy.

Imported by the scripts in bench/ (``python bench/<script>.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import gc
import time

import torch

GIB = 1024**3


def token_batches(n: int, batch: int, seq: int, vocab: int, seed: int, device=None) -> list[dict]:
    """``n`` causal-LM batches ``{"input_ids", "labels"}`` of random tokens (the same tensor twice),
    drawn from a CPU generator seeded with ``seed`` (identical on every machine), then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
        out.append({"input_ids": ids, "labels": ids})
    return out


def llama8b_config(layers: int, tiny: bool = False):
    """Llama-3-8B's shape (hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 128256) with
    ``layers`` decoder layers; ``tiny=True`` gives a small model of the same structure for CPU smoke runs."""
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False,
    )  # fmt: skip


def quantize_linears(
    model: torch.nn.Module, device: torch.device | str, compute_dtype: torch.dtype = torch.bfloat16
) -> torch.nn.Module:
    """Replace every nn.Linear except the LM head by a bnb NF4 ``Linear4bit`` (double quantisation,
    blocksize 64), quantised by moving it to ``device``. In place; returns ``model``."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        # device="meta": the placeholder weight replaced below is never initialised (an fp32 Kaiming
        # init on the CPU took ~10 s for 8 layers of the 8B shape).
        q = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                              device="meta")  # fmt: skip
        q.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4",
                                     compress_statistics=True, blocksize=64, module=q)  # fmt: skip
        if module.bias is not None:
            q.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        q = q.to(device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


def sync(device: torch.device) -> None:
    """Wait for the device (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh(device: torch.device) -> int:
    """Free cached memory and reset the peak counter; returns the bytes still allocated (0 on the CPU)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    return 0


def peak_gib(device: torch.device, base: int = 0) -> float:
    """Peak allocated GiB since the last :func:`fresh`, minus ``base`` bytes (0.0 on the CPU)."""
    return (torch.cuda.max_memory_allocated(device) - base) / GIB if device.type == "cuda" else 0.0


def sleep_cycles_per_ms() -> float:
    """GPU clock cycles of ``torch.cuda._sleep`` per millisecond on this GPU (measured)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    torch.cuda.synchronize()
    return 10_000_000 / start.elapsed_time(end)


def queued(call, calls: int, one_ms: float, cycles_per_ms: float) -> tuple[float, float]:
    """``(host_ms, gpu_ms)`` per call of ``calls`` calls queued behind a GPU sleep longer than the host
    needs to issue them (``one_ms``: a synchronised call's wall time), so the host never waits on the
    GPU: host = the Python loop's wall time (what the CPU spends), GPU = CUDA events from the end of
    the sleep (the kernels back to back)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(cycles_per_ms * (3 * one_ms * calls + 50)))
    start.record()
    t = time.perf_counter()
    for _ in range(calls):
        call()
    host = time.perf_counter() - t
    end.record()
    end.synchronize()
    return host / calls * 1e3, start.elapsed_time(end) / calls


class OneLayer(torch.nn.Module):
    """A model holding one layer as ``.lin``: what PEFT's ``get_peft_model(..., target_modules=["lin"])``
    wraps in the single-layer benchmarks."""

    def __init__(self, lin: torch.nn.Module) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)
