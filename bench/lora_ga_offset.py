"""What LoRA-GA's offset does to a half-precision base, and what the exact alternative costs (CPU).

LoRA-GA starts from ``W0 − s·B0·A0`` so that the patched model equals the base. ``offset="base"``
subtracts it from ``W0`` in place, rounded to W0's dtype; ``offset="frozen"`` keeps ``W0`` and a
frozen rank-r term in the layer (``W0 + s·(B·A − B0·A0)``, a rank-2r op). For each base dtype this
measures, after ``patch(method="lora_ga")`` on a tiny Llama (random init, random tokens):

* the init's logits against the base model's (relative Frobenius error): LoRA-GA promises 0;
* ``unpatch`` (no merge): how far the restored ``W0`` is from the original (max relative per layer);

and the frozen term's cost: FLOPs per token (counted), its buffers' bytes, and the measured time of a
forward+backward training step with either offset on the CPU (fp32, where both offsets are exact,
so only the cost differs).

    python bench/lora_ga_offset.py          # writes bench/results/lora_ga_offset_cpu.json
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import fastlora

HERE = Path(__file__).resolve().parent


def llama(hidden: int, layers: int, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).to(dtype).eval()


def batches(n: int, batch: int, seq: int, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (batch, seq), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


def relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def init_accuracy(dtype: torch.dtype, offset: str, r: int = 8) -> dict:
    base = llama(128, 2, dtype)
    data, ids = batches(4, 2, 32, 1), torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    model = fastlora.patch(
        copy.deepcopy(base), method="lora_ga", r=r, alpha=2 * r, data=data, offset=offset, progress=False
    )
    with torch.no_grad():
        init = model(input_ids=ids).logits
    in_base = [layer.offset_in_base for layer in fastlora.lora_layers(model).values()]
    restored = fastlora.unpatch(model)
    restore = max(
        float(((p.double() - q.double()).abs().max() / q.double().abs().max()).item())
        for (_, p), (_, q) in zip(restored.named_parameters(), base.named_parameters())
    )
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "offset": offset,
        "offset_in_base": all(in_base),
        "init_logits_relerr": relerr(init, ref),
        "unpatch_restore_max_relerr": restore,
    }


def step_times(hidden: int, r: int, repeats: int) -> list[dict]:
    """Forward+backward of a training step with either offset, the two models interleaved (so that
    a busy shared CPU slows both alike), and the frozen term's counted cost."""
    data = batches(2, 4, 256, 3)
    models = {
        offset: fastlora.patch(
            llama(hidden, 2, torch.float32),
            method="lora_ga",
            r=r,
            alpha=2 * r,
            data=data,
            offset=offset,
            progress=False,
        )
        for offset in ("base", "frozen")
    }
    times: dict[str, list[float]] = {offset: [] for offset in models}
    for i in range(repeats + 1):
        for offset, model in models.items():
            t0 = time.perf_counter()
            model(**data[0]).loss.backward()
            if i:  # the first round warms up
                times[offset].append(time.perf_counter() - t0)
            for p in model.parameters():
                p.grad = None
    rows = []
    for offset, model in models.items():
        layers = fastlora.lora_layers(model).values()
        frozen_bytes = sum(
            la.lora_A0.numel() * la.lora_A0.element_size() + la.lora_B0.numel() * la.lora_B0.element_size()
            for la in layers
            if not la.offset_in_base
        )
        # Per token: the base linears cost 4·in·out in a LoRA step (forward, dX; no dW). A rank-r LoRA
        # term adds 2r(in+out) forward and 4r(in+out) backward (dX, dA, dB); the frozen term doubles r.
        base_flops = sum(4 * la.in_features * la.out_features for la in layers)
        lora_flops = sum(6 * la.r * (la.in_features + la.out_features) for la in layers)
        rows.append(
            {
                "offset": offset,
                "hidden": hidden,
                "r": r,
                "tokens": data[0]["input_ids"].numel(),
                "step_s_median": statistics.median(times[offset]),
                "step_s_all": times[offset],
                "frozen_buffer_bytes": frozen_bytes,
                "lora_param_bytes": sum(4 * la.r * (la.in_features + la.out_features) for la in layers),
                "flops_per_token_base_linear": base_flops,
                "flops_per_token_lora": lora_flops,
                "flops_per_token_frozen_extra": lora_flops if offset == "frozen" else 0,
            }
        )
    return rows


def llama8b_frozen_cost(r: int = 16) -> dict:
    """The frozen term's cost on Llama-3-8B's linear shapes (all 7 per block), counted: FLOPs per token
    against the base linears' forward+backward (4·in·out, no dW), and its fp32 buffers."""
    h, kv, inter, blocks = 4096, 1024, 14336, 32
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    base = sum(4 * i * o for i, o in shapes)
    extra = sum(6 * r * (i + o) for i, o in shapes)
    buffers = blocks * sum(4 * r * (i + o) for i, o in shapes)
    return {
        "r": r,
        "extra_flops_fraction": extra / base,
        "frozen_buffer_gib": buffers / 2**30,
        "adapter_training_state_gib": 4 * buffers / 2**30,  # A, B, their grads, two AdamW moments (fp32)
    }


def main() -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = {"torch": torch.__version__, "python": sys.version.split()[0], "date": time.strftime("%Y-%m-%d %H:%M")}
    out["init"] = [
        init_accuracy(dtype, offset)
        for dtype in (torch.bfloat16, torch.float16, torch.float32)
        for offset in ("base", "frozen", "auto")
    ]
    for row in out["init"]:
        print(
            f"{row['dtype']:9s} offset={row['offset']:6s} (in base: {row['offset_in_base']!s:5s}): init logits "
            f"rel. err {row['init_logits_relerr']:.2e}, unpatch restores W0 to {row['unpatch_restore_max_relerr']:.2e}"
        )
    out["cost"] = [row for hidden in (256, 512) for row in step_times(hidden, 16, 9)]
    for row in out["cost"]:
        extra = row["flops_per_token_frozen_extra"] / row["flops_per_token_base_linear"]
        print(
            f"hidden {row['hidden']} r={row['r']} offset={row['offset']:6s}: step {row['step_s_median'] * 1e3:7.1f} ms, "
            f"frozen buffers {row['frozen_buffer_bytes'] / 2**20:.2f} MiB (LoRA params "
            f"{row['lora_param_bytes'] / 2**20:.2f} MiB), extra linear FLOPs {100 * extra:.2f}%"
        )
    out["llama8b_counted"] = big = llama8b_frozen_cost()
    print(
        f"Llama-3-8B shapes, r=16 (counted): frozen term +{100 * big['extra_flops_fraction']:.2f}% linear FLOPs, "
        f"{big['frozen_buffer_gib']:.3f} GiB buffers (adapter training state {big['adapter_training_state_gib']:.3f} GiB)"
    )
    path = HERE / "results" / "lora_ga_offset_cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
