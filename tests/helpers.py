"""Test helpers shared by the test modules (importable because pyproject puts tests/ on sys.path)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch


def relerr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf (NaN never passes)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


def token_batches(n: int, batch: int = 2, seq: int = 10, vocab: int = 96, seed: int = 0) -> list[dict]:
    """``n`` causal-LM batches ``{"input_ids", "labels"}`` of random tokens from a generator seeded with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    kw.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**kw)).eval()


def tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return Qwen2ForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def quantize_model_bnb(
    model: torch.nn.Module,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
    blocksize: int = 64,
    quant_storage: torch.dtype = torch.uint8,
):
    """A copy of ``model`` with every nn.Linear except the LM head replaced by a bnb Linear4bit (CPU).

    ``quant_storage`` is bitsandbytes' dtype for the packed bytes (a float one lets FSDP shard them).
    """
    import bitsandbytes as bnb

    model = copy.deepcopy(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        q = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=module.bias is not None,
            compute_dtype=torch.float32, compress_statistics=compress_statistics, quant_type=quant_type,
            quant_storage=quant_storage,
        )  # fmt: skip
        q.weight = bnb.nn.Params4bit(
            module.weight.data.clone(), requires_grad=False, quant_type=quant_type,
            compress_statistics=compress_statistics, blocksize=blocksize, quant_storage=quant_storage,
        )  # fmt: skip
        if module.bias is not None:
            q.bias = torch.nn.Parameter(module.bias.data.clone(), requires_grad=False)
        q = q.to("cpu")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model


def run_two_ranks(worker_source: str, args: list[str], tmp_path: Path, timeout: float) -> None:
    """Run ``worker_source`` as a script in 2 processes (``RANK`` 0/1, ``WORLD_SIZE`` 2) and wait.

    The workers get ``args`` on their command line and tests/ on ``PYTHONPATH``; a failing rank
    fails the test with its log.
    """
    script = tmp_path / "worker.py"
    script.write_text(worker_source)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, WORLD_SIZE="2", OMP_NUM_THREADS="1", PYTHONPATH=tests_dir)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), *args],
            env=dict(env, RANK=str(rank)),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    for p in procs:
        log = p.communicate(timeout=timeout)[0].decode()
        assert p.returncode == 0, log


def tiny_t5(seed: int = 0):
    """A tiny encoder-decoder (T5); call it with ``labels`` (or ``decoder_input_ids``)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=96, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(cfg).eval()


def tiny_opt(seed: int = 0):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=96, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64,
    )  # fmt: skip
    return OPTForCausalLM(cfg).eval()


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model(input_ids=ids).logits`` without autograd."""
    with torch.no_grad():
        return model(input_ids=ids).logits
