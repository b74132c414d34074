"""fastlora under torch.distributed: DDP, FSDP2 (fp32, bf16, NF4) and LoRA-GA, 2 ranks on the CPU.

One module-scoped fixture launches ``distributed_worker.py`` as two processes (gloo backend, a
free localhost port) that run every scenario once and save what each rank saw; the tests here
compare that with single-process runs on the union of the ranks' batches, computed in this process
with the worker's own helpers. The GPU side (NCCL, H200s) is ``bench/bench_distributed.py``.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

import distributed_worker as w  # tests/ is on sys.path (pyproject: pythonpath)
from helpers import quantize_model_bnb, relerr, tiny_llama

import fastlora

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None

SCENARIOS = ["ddp", "fsdp_fp32", "fsdp_bf16", "lora_ga"] + (["fsdp_nf4", "fsdp_nf4_replicated"] if HAS_BNB else [])
FSDP_KINDS = {"fsdp_fp32": "fp32", "fsdp_bf16": "bf16", "fsdp_nf4": "nf4", "fsdp_nf4_replicated": "nf4"}
TIMEOUT_S = 300
# Gradient/parameter tolerances (relative Frobenius error): fp32 sums in another order; bf16
# rounds activations differently when the batch is split, which the LoRA grads inherit.
TOL = {"fp32": 1e-5, "nf4": 1e-5, "bf16": 3e-2}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Run every scenario on 2 gloo ranks once; the directory of their results and adapters."""
    out = tmp_path_factory.mktemp("dist")
    port = _free_port()
    procs, logs = [], []
    for rank in range(w.WORLD):
        env = dict(
            os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(w.WORLD),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
        )  # fmt: skip
        log = open(out / f"log_rank{rank}.txt", "w")  # noqa: SIM115 (closed below)
        logs.append(log)
        # cwd is the scratch dir, never the repo root, whose kernels/ folder would shadow a package.
        cmd = [sys.executable, str(Path(w.__file__).resolve()), str(out), *SCENARIOS]
        procs.append(subprocess.Popen(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break  # a rank died: its peer would wait in a collective until gloo's timeout
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    if any(p.returncode != 0 for p in procs):
        tails = "\n".join(
            f"--- rank {r} (exit {p.returncode}) ---\n" + (out / f"log_rank{r}.txt").read_text()[-4000:]
            for r, p in enumerate(procs)
        )
        pytest.fail(f"the 2-process run failed:\n{tails}")
    return out


def _result(run_dir: Path, scenario: str, rank: int = 0) -> dict:
    return torch.load(run_dir / f"{scenario}_rank{rank}.pt", weights_only=False)


@functools.cache
def _single_process(kind: str) -> tuple[dict, list[float], dict, torch.Tensor]:
    """(first grads, losses, trained LoRA params, probe logits) of one process on the union batch."""
    model = w.build(kind)
    grads, losses = w.train(model, w.union_ids())
    return grads, losses, w.lora_state(model), w.probe_logits(model)


def _assert_close_dicts(got: dict, ref: dict, tol: float, what: str) -> None:
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] is not None, f"{what} {key}: no value"
        assert got[key].shape == ref[key].shape, f"{what} {key}: shape {got[key].shape} != {ref[key].shape}"
        err = relerr(got[key], ref[key])
        assert err < tol, f"{what} {key}: relative error {err:.2e} >= {tol:.0e}"


# -- DDP ---------------------------------------------------------------------------------------------


def test_ddp_gradients_equal_single_process_on_union(run_dir):
    r0, r1 = _result(run_dir, "ddp", 0), _result(run_dir, "ddp", 1)
    ref_grads = _single_process("fp32")[0]
    assert len(ref_grads) == 2 * 14  # 7 linear layers per block, 2 blocks, A and B each
    for key in ref_grads:  # DDP's all-reduce leaves every rank with the same averaged gradient
        assert torch.equal(r0["grads"][key], r1["grads"][key]), key
        assert ref_grads[key].abs().max() > 0, f"{key}: zero reference gradient proves nothing"
        torch.testing.assert_close(r0["grads"][key], ref_grads[key], rtol=1e-4, atol=1e-7, msg=key)


def test_ddp_trains_like_single_process_and_saves_a_peft_adapter(run_dir):
    peft = pytest.importorskip("peft")
    res = _result(run_dir, "ddp")
    _, ref_losses, ref_params, _ = _single_process("fp32")
    assert res["losses"][-1] < res["losses"][0] - 0.05, res["losses"]
    assert res["losses"] == pytest.approx(ref_losses, rel=1e-5)
    _assert_close_dicts(res["params"], ref_params, TOL["fp32"], "trained")
    adapter = run_dir / "ddp_adapter"
    keys = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert keys and not any(k.startswith("module.") for k in keys)  # the DDP wrapper was unwrapped
    pm = peft.PeftModel.from_pretrained(tiny_llama(0), str(adapter)).eval()
    with torch.no_grad():
        theirs = pm(input_ids=w.probe_ids()).logits
    torch.testing.assert_close(theirs, res["logits"], rtol=1e-5, atol=1e-5)


# -- FSDP2 -------------------------------------------------------------------------------------------

fsdp_scenarios = pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s.startswith("fsdp")])


@fsdp_scenarios
def test_fsdp_gradients_equal_single_process_on_union(run_dir, scenario):
    kind = FSDP_KINDS[scenario]
    r0, r1 = _result(run_dir, scenario, 0), _result(run_dir, scenario, 1)
    ref_grads = _single_process(kind)[0]
    for key in ref_grads:  # gathered from the reduce-scattered shards: the same on both ranks
        assert torch.equal(r0["grads"][key], r1["grads"][key]), key
    _assert_close_dicts(r0["grads"], ref_grads, TOL[kind], "gradient")


@fsdp_scenarios
def test_fsdp_trains_like_single_process(run_dir, scenario):
    kind = FSDP_KINDS[scenario]
    res = _result(run_dir, scenario)
    _, ref_losses, ref_params, _ = _single_process(kind)
    assert res["losses"][-1] < res["losses"][0] - 0.05, res["losses"]
    assert res["losses"] == pytest.approx(ref_losses, rel=TOL[kind])
    _assert_close_dicts(res["params"], ref_params, TOL[kind], "trained")


@fsdp_scenarios
def test_fsdp_shards_parameters_but_the_op_sees_whole_weights(run_dir, scenario):
    res = _result(run_dir, scenario)
    replicated = scenario.endswith("replicated")
    # Outside forward every LoRA parameter, and every base weight unless ignored, is a DTensor shard.
    assert res["sharded"] and all(lora for _, lora in res["sharded"].values())
    assert all(base != replicated for base, _ in res["sharded"].values())
    # Inside forward (STEPS train steps + 1 probe), the op got whole weights, equal to the originals.
    for name, calls in res["seen"].items():
        assert len(calls) == w.STEPS + 1, name
        assert all(calls), f"{name}: the LoRA op saw a sharded or changed weight"


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s in ("fsdp_fp32", "fsdp_bf16", "fsdp_nf4")])
def test_fsdp_sharded_base_weight_read_outside_forward_is_refused(run_dir, scenario):
    error = _result(run_dir, scenario)["merge_error"]
    assert error.startswith("RuntimeError: fastlora: the base weight of layer model.layers.0.self_attn.q_proj")
    assert "sharded by FSDP2" in error


@fsdp_scenarios
def test_fsdp_save_adapter_gathers_a_full_adapter_peft_loads(run_dir, scenario):
    peft = pytest.importorskip("peft")
    kind = FSDP_KINDS[scenario]
    res = _result(run_dir, scenario)
    adapter = run_dir / f"{scenario}_adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    base = tiny_llama(0)
    if kind == "bf16":
        base = base.to(torch.bfloat16)
    elif kind == "nf4":
        base = quantize_model_bnb(base)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)).eval()
    # PEFT holds the full (gathered) A and B, equal to what the sharded run trained.
    loaded = {}
    for name in fastlora.lora_layers(w.build(kind)):
        module = pm.base_model.model.get_submodule(name)
        loaded[f"{name}.lora_A"] = module.lora_A["default"].weight.detach()
        loaded[f"{name}.lora_B"] = module.lora_B["default"].weight.detach()
    _assert_close_dicts(loaded, res["params"], 1e-7, "loaded")
    if kind == "nf4":
        return  # PEFT re-quantises 4-bit weights on the CPU: whole-model logits differ by that noise
    with torch.no_grad():
        theirs = pm(input_ids=w.probe_ids()).logits.float()
    # bf16: PEFT runs the LoRA branch in fp32, fastlora in the activation dtype.
    assert relerr(theirs, res["logits"]) < (1e-6 if kind == "fp32" else 1e-2)


# -- LoRA-GA -----------------------------------------------------------------------------------------


def _sign_aligned(got: torch.Tensor, ref: torch.Tensor, key: str) -> torch.Tensor:
    """``got`` with each singular vector (a row of A, a column of B) flipped to match ``ref``'s sign."""
    vectors_as_rows = key.endswith("lora_A")
    g, r = (got, ref) if vectors_as_rows else (got.t(), ref.t())
    signs = torch.where((g * r).sum(dim=1) < 0, -1.0, 1.0)[:, None]
    g = g * signs
    return g if vectors_as_rows else g.t()


def test_lora_ga_init_identical_on_ranks_and_equal_to_single_process_on_union(run_dir):
    r0, r1 = _result(run_dir, "lora_ga", 0)["init"], _result(run_dir, "lora_ga", 1)["init"]
    for key in r0:  # estimate_gradient all-reduces, the SVD is seeded: bit-identical on every rank
        assert torch.equal(r0[key], r1[key]), key
    model = tiny_llama(0)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    data = w.lora_ga_batches(w.union_ids())
    fastlora.patch(model, method="lora_ga", r=w.R, alpha=w.ALPHA, data=data, iters=len(data), progress=False)
    ref = w.lora_ga_result(model)
    assert r0.keys() == ref.keys()
    # A singular vector's sign is arbitrary, and the SVD of the all-reduced gradient (equal to the
    # union's up to ~1e-7) may pick the other one: compare A and B up to the sign of each vector.
    for key in (k for k in ref if not k.endswith(".base")):
        assert ref[key].abs().max() > 0, key
        err = relerr(_sign_aligned(r0[key], ref[key], key), ref[key])
        assert err < 1e-4, f"LoRA-GA init {key}: relative error {err:.2e} up to signs"
    # Whatever the signs, each rank offset its base weight by exactly its own s·B·A.
    scaling = w.ALPHA / w.R
    for name in (k.removesuffix(".base") for k in ref if k.endswith(".base")):
        W = r0[f"{name}.base"] + scaling * r0[f"{name}.lora_B"] @ r0[f"{name}.lora_A"]
        assert relerr(W, original[name]) < 1e-5, name
        assert relerr(r0[f"{name}.base"], original[name]) > 1e-4, f"{name}: no offset was applied"
