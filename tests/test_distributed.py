"""fastlora under torch.distributed: DDP, FSDP2 (fp32, bf16, NF4) and LoRA-GA, 2 ranks.

Two processes of ``distributed_worker.py`` (a free localhost port) run the scenarios and save what
each rank saw; the tests here compare that with single-process runs on the union of the ranks'
batches, computed in this process with the worker's own helpers. Each test runs twice: ``gloo-cpu``
(2 CPU processes; in CI) and ``nccl-2gpu`` (NCCL, one CUDA GPU per rank, skipped with fewer than 2
GPUs). One pair of processes runs every scenario (one start-up: CI stays fast); when a rank dies or
hangs, the crash fails only the tests of the scenario it was in, with both ranks' logs of that
scenario in the message, and the scenarios after it run in a fresh pair. The GPU throughput side is
``bench/bench_distributed.py``.
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
from fastlora._dist import is_dtensor

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None

NF4_SCENARIOS = ["fsdp_nf4", "fsdp_nf4_helper", "fsdp_nf4_replicated", "fsdp_nf4_one_unit_replicated"]
FP32_SCENARIOS = ["fsdp_fp32", "fsdp_fp32_grouped", "fsdp_fp32_replicated_lora"]
SCENARIOS = ["ddp", *FP32_SCENARIOS, "fsdp_bf16", "lora_ga"] + (NF4_SCENARIOS if HAS_BNB else [])
FSDP_KINDS = dict.fromkeys(FP32_SCENARIOS, "fp32") | {"fsdp_bf16": "bf16"} | dict.fromkeys(NF4_SCENARIOS, "nf4")
# A scenario that makes no progress for this long is declared hung (gloo's own timeout is 120 s).
SCENARIO_TIMEOUT_S = 150
# Gradient/parameter tolerances (relative Frobenius error): fp32 sums in another order; bf16
# rounds activations differently when the batch is split, which the LoRA grads inherit. On the
# GPU the kernels tile by batch size, so splitting the batch changes the summation order more.
TOL = {"cpu": {"fp32": 1e-5, "nf4": 1e-5, "bf16": 3e-2}, "cuda": {"fp32": 1e-4, "nf4": 1e-4, "bf16": 5e-2}}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scenario_log(text: str, scenario: str, limit: int = 6000) -> str:
    """The part of a rank's log from ``scenario``'s begin line on (its last ``limit`` characters)."""
    marker = w.BEGIN + scenario
    at = text.find(marker)
    part = text[at:] if at >= 0 else text
    return part if len(part) <= limit else "...\n" + part[-limit:]


class Run:
    """The 2-process runs of one backend: ``device`` "cpu" (gloo) or "cuda" (NCCL); results in ``path``.

    Scenarios run lazily, all in one pair of processes; a crash or hang is pinned on the scenario
    that had no results yet, and the ones after it are run again in a new pair.
    """

    def __init__(self, path: Path, device: str, scenarios: list[str] = SCENARIOS) -> None:
        self.path, self.device = path, device
        self.failures: dict[str, str] = {}
        self._pending = list(scenarios)
        self._launches = 0

    def tol(self, kind: str) -> float:
        return TOL[self.device][kind]

    def _done(self, name: str) -> bool:
        return all((self.path / f"{name}_rank{r}.pt").exists() for r in range(w.WORLD))

    def _launch(self, names: list[str]) -> None:
        self._launches += 1
        port, tag = _free_port(), f"launch{self._launches}"
        procs, logs = [], []
        for rank in range(w.WORLD):
            env = dict(
                os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(w.WORLD),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", FASTLORA_DIST_DEVICE=self.device,
                NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
            )  # fmt: skip
            log = open(self.path / f"{tag}_rank{rank}.log", "w")  # noqa: SIM115 (closed below)
            logs.append(log)
            # cwd is the scratch dir, never the repo root, whose kernels/ folder would shadow a package.
            cmd = [sys.executable, str(Path(w.__file__).resolve()), str(self.path), *names]
            procs.append(subprocess.Popen(cmd, cwd=self.path, env=env, stdout=log, stderr=subprocess.STDOUT))
        hung = False
        try:
            done, last_progress = 0, time.monotonic()
            while any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs):
                    break  # a rank died: its peer would wait in a collective until the backend's timeout
                now_done = sum(self._done(n) for n in names)
                if now_done > done:
                    done, last_progress = now_done, time.monotonic()
                elif time.monotonic() - last_progress > SCENARIO_TIMEOUT_S:
                    hung = True
                    break
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()
            for log in logs:
                log.close()
        missing = [n for n in names if not self._done(n)]
        if not missing:
            return  # an exit code after the last result (teardown) does not void the results
        crashed = missing[0]
        why = f"hung (no progress for {SCENARIO_TIMEOUT_S} s)" if hung else "crashed"
        texts = [(self.path / f"{tag}_rank{r}.log").read_text(errors="replace") for r in range(w.WORLD)]
        self.failures[crashed] = f"scenario {crashed!r} {why} on {self.device}:\n" + "\n".join(
            f"--- rank {r} (exit {p.returncode}) ---\n{_scenario_log(t, crashed)}"
            for r, (p, t) in enumerate(zip(procs, texts))
        )
        self._pending = missing[1:] + self._pending

    def result(self, scenario: str, rank: int = 0) -> dict:
        """What ``rank`` saved for ``scenario`` (running the pending scenarios first); fails if it crashed."""
        while self._pending and scenario not in self.failures and not self._done(scenario):
            names, self._pending = self._pending, []
            self._launch(names)
        if scenario in self.failures:
            pytest.fail(self.failures[scenario], pytrace=False)
        return torch.load(self.path / f"{scenario}_rank{rank}.pt", weights_only=False)


BACKENDS = [
    pytest.param("cpu", id="gloo-cpu"),
    pytest.param(
        "cuda", id="nccl-2gpu",
        marks=[pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")],
    ),
]  # fmt: skip


@pytest.fixture(scope="module", params=BACKENDS)
def run(request, tmp_path_factory) -> Run:
    """The 2-rank runs of one backend (gloo on the CPU or NCCL on 2 GPUs)."""
    return Run(tmp_path_factory.mktemp(f"dist-{request.param}"), request.param)


def _result(run: Run, scenario: str, rank: int = 0) -> dict:
    return run.result(scenario, rank)


@functools.cache
def _single_process(kind: str, device: str) -> tuple[dict, list[float], dict, torch.Tensor]:
    """(first grads, losses, trained LoRA params, probe logits) of one process on the union batch."""
    model = w.build(kind, device)
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


def test_ddp_gradients_equal_single_process_on_union(run):
    r0, r1 = _result(run, "ddp", 0), _result(run, "ddp", 1)
    ref_grads = _single_process("fp32", run.device)[0]
    assert len(ref_grads) == 2 * 14  # 7 linear layers per block, 2 blocks, A and B each
    for key in ref_grads:  # DDP's all-reduce leaves every rank with the same averaged gradient
        assert torch.equal(r0["grads"][key], r1["grads"][key]), key
        assert ref_grads[key].abs().max() > 0, f"{key}: zero reference gradient proves nothing"
    _assert_close_dicts(r0["grads"], ref_grads, run.tol("fp32"), "gradient")


def test_ddp_trains_like_single_process_and_saves_a_peft_adapter(run):
    peft = pytest.importorskip("peft")
    res = _result(run, "ddp")
    _, ref_losses, ref_params, _ = _single_process("fp32", run.device)
    assert res["losses"][-1] < res["losses"][0] - 0.05, res["losses"]
    assert res["losses"] == pytest.approx(ref_losses, rel=run.tol("fp32"))
    _assert_close_dicts(res["params"], ref_params, run.tol("fp32"), "trained")
    adapter = run.path / "ddp_adapter"
    keys = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert keys and not any(k.startswith("module.") for k in keys)  # the DDP wrapper was unwrapped
    pm = peft.PeftModel.from_pretrained(tiny_llama(0), str(adapter)).eval()
    with torch.no_grad():
        theirs = pm(input_ids=w.probe_ids()).logits  # PEFT on the CPU, whatever ran the training
    assert relerr(theirs, res["logits"]) < (1e-6 if run.device == "cpu" else 1e-4)


# -- FSDP2 -------------------------------------------------------------------------------------------

fsdp_scenarios = pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s.startswith("fsdp")])


@fsdp_scenarios
def test_fsdp_gradients_equal_single_process_on_union(run, scenario):
    kind = FSDP_KINDS[scenario]
    r0, r1 = _result(run, scenario, 0), _result(run, scenario, 1)
    ref_grads = _single_process(kind, run.device)[0]
    for key in ref_grads:  # gathered from the reduce-scattered shards: the same on both ranks
        assert torch.equal(r0["grads"][key], r1["grads"][key]), key
    _assert_close_dicts(r0["grads"], ref_grads, run.tol(kind), "gradient")


@fsdp_scenarios
def test_fsdp_trains_like_single_process(run, scenario):
    kind = FSDP_KINDS[scenario]
    res = _result(run, scenario)
    _, ref_losses, ref_params, _ = _single_process(kind, run.device)
    assert res["losses"][-1] < res["losses"][0] - 0.05, res["losses"]
    assert res["losses"] == pytest.approx(ref_losses, rel=run.tol(kind))
    _assert_close_dicts(res["params"], ref_params, run.tol(kind), "trained")


@fsdp_scenarios
def test_fsdp_shards_parameters_but_the_op_sees_whole_weights(run, scenario):
    res = _result(run, scenario)
    replicated, lora_replicated = scenario.endswith("replicated"), scenario.endswith("replicated_lora")
    # Outside forward every LoRA parameter and every base weight, unless ignored, is a DTensor shard.
    assert res["sharded"] and all(lora != lora_replicated for _, lora in res["sharded"].values())
    assert all(base != replicated for base, _ in res["sharded"].values())
    # Inside forward (STEPS train steps + 1 probe), the op got whole weights, equal to the originals.
    for name, calls in res["seen"].items():
        assert len(calls) == w.STEPS + 1, name
        assert all(calls), f"{name}: the LoRA op saw a sharded or changed weight"


def test_fsdp_keep_embeddings_leaves_the_table_gathered_after_the_steps(run):
    assert _result(run, "fsdp_fp32_grouped")["embed_sharded"] is False
    assert _result(run, "fsdp_fp32")["embed_sharded"] is True


@fsdp_scenarios
def test_fsdp_shards_only_floating_point_parameters(run, scenario):
    """torch < 2.13 cannot shard any other (the nccl-2gpu run on torch 2.11 crashed so on uint8 NF4 bytes)."""
    assert _result(run, scenario)["nonfloat_sharded"] == []


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s.startswith("fsdp") and not s.endswith("replicated")])
def test_fsdp_sharded_base_weight_read_outside_forward_is_refused(run, scenario):
    error = _result(run, scenario)["merge_error"]
    assert error.startswith("RuntimeError: fastlora: the base weight of layer model.layers.0.self_attn.q_proj")
    assert "sharded by FSDP2" in error


@fsdp_scenarios
def test_fsdp_save_adapter_gathers_a_full_adapter_peft_loads(run, scenario):
    peft = pytest.importorskip("peft")
    kind = FSDP_KINDS[scenario]
    res = _result(run, scenario)
    adapter = run.path / f"{scenario}_adapter"
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
    tol = 1e-2 if kind == "bf16" else (1e-6 if run.device == "cpu" else 1e-4)
    assert relerr(theirs, res["logits"]) < tol


# -- LoRA-GA -----------------------------------------------------------------------------------------


def _sign_aligned(got: torch.Tensor, ref: torch.Tensor, key: str) -> torch.Tensor:
    """``got`` with each singular vector (a row of A, a column of B) flipped to match ``ref``'s sign."""
    vectors_as_rows = key.endswith("lora_A")
    g, r = (got, ref) if vectors_as_rows else (got.t(), ref.t())
    signs = torch.where((g * r).sum(dim=1) < 0, -1.0, 1.0)[:, None]
    g = g * signs
    return g if vectors_as_rows else g.t()


def test_lora_ga_init_identical_on_ranks_and_equal_to_single_process_on_union(run):
    r0, r1 = _result(run, "lora_ga", 0)["init"], _result(run, "lora_ga", 1)["init"]
    for key in r0:  # estimate_gradient all-reduces, the SVD is seeded: bit-identical on every rank
        assert torch.equal(r0[key], r1[key]), key
    model = tiny_llama(0)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    model.to(run.device)
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


# -- fastlora.fully_shard's checks (no process group needed) --------------------------------------------


def test_fully_shard_finds_the_decoder_blocks_and_refuses_bad_input():
    from fastlora.fsdp import decoder_blocks

    model = tiny_llama(0)
    with pytest.raises(ValueError, match=r"no fastlora layers; call fastlora.patch\(model\) first"):
        fastlora.fully_shard(model)
    fastlora.patch(model, r=4)
    assert decoder_blocks(model) == list(model.model.layers)
    with pytest.raises(ValueError, match="base must be one of shard, replicate"):
        fastlora.fully_shard(model, base="half")
    with pytest.raises(ValueError, match=r"pass blocks=\[\.\.\.\]"):
        fastlora.fully_shard(torch.nn.Sequential(model.model.layers[0]))
    bad = [
        (dict(blocks_per_unit=0), "blocks_per_unit must be an int >= 1"),
        (dict(blocks_per_unit=True), "blocks_per_unit must be an int >= 1"),
        (dict(blocks_per_unit=2.0), "blocks_per_unit must be an int >= 1"),
        (dict(prefetch=-1), "prefetch must be an int >= 0"),
        (dict(backward_prefetch="2"), "backward_prefetch must be an int >= 0"),
        (dict(reshard_after_forward=0), "reshard_after_forward must be True, False or a number of ranks >= 1"),
        (dict(reshard_after_forward="no"), "reshard_after_forward must be True, False or a number of ranks >= 1"),
        (dict(lora="frozen"), "lora must be one of shard, replicate"),
        (dict(base="replicate", lora="replicate"), "base='replicate' with lora='replicate' leaves nothing to shard"),
    ]
    for kwargs, message in bad:  # refused before anything is sharded (no process group needed)
        with pytest.raises(ValueError, match=f"fastlora.fully_shard: {message}"):
            fastlora.fully_shard(model, **kwargs)
    assert not any(is_dtensor(p) for p in model.parameters())


@pytest.fixture
def one_rank_group():
    """A 1-process gloo group in this process (FSDP2 needs one), torn down after the test; yields a CPU mesh.

    The mesh is passed explicitly: FSDP2's default mesh takes the accelerator's device type, which
    on a GPU machine would move these CPU models to the GPU.
    """
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def _step(model: torch.nn.Module) -> tuple[float, dict[str, torch.Tensor]]:
    ids = torch.randint(0, w.VOCAB, (2, w.SEQ), generator=torch.Generator().manual_seed(3))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: w.full(p.grad) for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def _assert_steps_match(model: torch.nn.Module, ref: torch.nn.Module, steps: int) -> None:
    """``steps`` forward/backward passes of the sharded ``model`` give the unsharded ``ref``'s loss and gradients."""
    for _ in range(steps):
        loss, grads = _step(model)
        ref_loss, ref_grads = _step(ref)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) == 14 * len(ref.model.layers)
    for name in grads:
        assert relerr(grads[name], ref_grads[name]) < 1e-5, name


def test_fully_shard_groups_blocks_into_units_with_prefetch_in_both_directions(one_rank_group):
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    ref = fastlora.patch(tiny_llama(0, num_hidden_layers=5).train(), r=4)
    model = copy.deepcopy(ref)
    fastlora.fully_shard(model, mesh=one_rank_group, blocks_per_unit=2, prefetch=1, backward_prefetch=2)
    layers, head = model.model.layers, model.lm_head
    state = [torch_fully_shard.state(m) for m in layers]
    # Units of 2 consecutive blocks, the last one shorter: [0, 1], [2, 3], [4].
    assert state[0] is state[1] and state[2] is state[3]
    assert len({id(state[0]), id(state[2]), id(state[4])}) == 3
    # Forward: each unit all-gathers the next (the head after the last blocks); backward runs the
    # units in reverse and gathers two ahead.
    assert state[0]._states_to_forward_prefetch == [state[2]]
    assert state[4]._states_to_forward_prefetch == [torch_fully_shard.state(head)]
    assert torch_fully_shard.state(head)._states_to_backward_prefetch == [state[4], state[2]]
    assert state[2]._states_to_backward_prefetch == [state[0]]
    _assert_steps_match(model, ref, steps=1)  # grouping changes the schedule only


def test_fully_shard_keeps_the_embeddings_gathered_only_when_asked(one_rank_group):
    kept = fastlora.patch(tiny_llama(0).train(), r=4)
    fastlora.fully_shard(kept, mesh=one_rank_group, keep_embeddings=True)
    default = fastlora.patch(tiny_llama(0).train(), r=4)
    fastlora.fully_shard(default, mesh=one_rank_group)
    for model in (kept, default):
        for _ in range(2):
            _step(model)
        assert is_dtensor(model.model.layers[0].self_attn.q_proj.base_layer.weight)  # blocks resharded
    assert not is_dtensor(kept.model.embed_tokens.weight)  # still whole after the steps
    assert is_dtensor(default.model.embed_tokens.weight)


def test_fully_shard_replicated_lora_leaves_fsdp2_only_the_frozen_base(one_rank_group):
    ref = fastlora.patch(tiny_llama(0).train(), r=4)
    model = copy.deepcopy(ref)
    fastlora.fully_shard(model, mesh=one_rank_group, lora="replicate")
    assert all(is_dtensor(p) != p.requires_grad for p in model.parameters())
    _assert_steps_match(model, ref, steps=2)  # the second backward accumulates into the averaged first


def test_fully_shard_replicated_base_in_one_unit_shards_only_lora(one_rank_group):
    from torch.distributed.fsdp import fully_shard as torch_fully_shard

    model = fastlora.patch(tiny_llama(0).train(), r=4)
    fastlora.fully_shard(
        model, mesh=one_rank_group, base="replicate", blocks_per_unit=None, reshard_after_forward=False
    )
    layers = model.model.layers
    assert torch_fully_shard.state(layers[0]) is torch_fully_shard.state(layers[1])
    # The embeddings and the head hold only frozen (ignored) parameters: no units of their own.
    for module in (model.model.embed_tokens, model.lm_head):
        assert not any(is_dtensor(p) for p in module.parameters())
        assert not isinstance(module, torch.distributed.fsdp.FSDPModule)
    assert all(is_dtensor(p) == p.requires_grad for p in model.parameters())


# -- the harness: a crash fails its own scenario only -------------------------------------------------


def test_a_crashing_scenario_fails_alone_with_its_log_and_the_rest_still_run(tmp_path):
    run = Run(tmp_path, "cpu", ["selftest_ok", "selftest_crash", "selftest_ok2"])
    assert run.result("selftest_ok", 1) == {"rank": 1}
    with pytest.raises(pytest.fail.Exception) as info:
        run.result("selftest_crash")
    message = str(info.value)
    assert "scenario 'selftest_crash' crashed on cpu" in message
    assert "RuntimeError: selftest: rank 1 fails here" in message  # rank 1's traceback
    assert "selftest_ok2" not in message  # only the crashed scenario's part of the logs
    assert run.result("selftest_ok2", 0) == {"rank": 0}  # ran in a fresh pair of processes
    assert run._launches == 2


# -- the multi-GPU benchmark's plumbing ----------------------------------------------------------------

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_distributed.py"


@pytest.mark.skipif(not BENCH.is_file(), reason="bench/ is not part of this checkout")
def test_bench_distributed_smoke_runs_every_arm_on_1_and_2_processes(tmp_path):
    """``bench/bench_distributed.py --smoke``: torchrun with 1 and 2 gloo ranks, a tiny model on the CPU.

    Checks the launcher, the arms and the report, not speed (the GPU numbers need 2 GPUs).
    """
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for var in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        env.pop(var, None)  # the script must set them itself
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--gpus", "1", "2", "--json", str(out)]
        + ([] if HAS_BNB else ["--quant", "bf16"]),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    got = {(r["arm"], r["quant"], r["gpus"]) for r in rows}
    quants = ("fp32", "nf4") if HAS_BNB else ("fp32",)
    want = {(a, q, n) for q in quants for a, n in [("single", 1), ("ddp", 1), ("fsdp2", 1), ("ddp", 2), ("fsdp2", 2)]}
    assert want <= got, sorted(want - got)
    for r in rows:
        assert "error" not in r, r
        assert r["tokens_per_s"] > 0 and r["efficiency_vs_arm_1gpu"] > 0
        # NVLink multicast off in every rank's environment, though the caller did not set it.
        assert r["env"] == {
            "NCCL_NVLS_ENABLE": "0",
            "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1",
        }
    # Same weights and data at a given world size: every wrapper computes the same first gradient.
    for q in quants:
        for n in (1, 2):
            norms = [r["first_lora_grad_norm"] for r in rows if r["quant"] == q and r["gpus"] == n]
            assert max(norms) == pytest.approx(min(norms), rel=1e-5), (q, n, norms)


@pytest.mark.skipif(not BENCH.is_file(), reason="bench/ is not part of this checkout")
def test_bench_distributed_smoke_new_layouts_profile_the_best_and_check_gradients(tmp_path):
    """The fully_shard layouts beyond the default ones, ``--profile-best`` and the gradient check (2 gloo ranks)."""
    out, prof = tmp_path / "bench.json", tmp_path / "profile.txt"
    arms = ["fsdp2-keep-g2-emb-cta", "fsdp2-keep-mp", "fsdp2-repl-1", "fsdp2-g2-emb-lrepl"]
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--gpus", "2", "--quant", "bf16", "--arms", *arms, "--profile-best",
         "--profile-out", str(prof), "--budget-s", "250", "--json", str(out)],
        cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = [r for r in data["rows"] if not r.get("profile_rerun")]
    assert [r["arm"] for r in rows] == arms and all(r["gpus"] == 2 for r in rows)
    for r in rows:
        assert "error" not in r and r["grad_norm_ok"], r
        assert 0 < r["host_ms"] <= r["step_ms"] * 1.01
    exact = [r["first_lora_grad_norm"] for r in rows if r["arm"] != "fsdp2-keep-mp"]
    assert max(exact) == pytest.approx(min(exact), rel=1e-5)
    mp = next(r["first_lora_grad_norm"] for r in rows if r["arm"] == "fsdp2-keep-mp")
    assert mp == pytest.approx(exact[0], rel=2e-2)  # bf16 LoRA gradients: close, not equal
    assert mp != exact[0]  # ...and not the fp32 ones: the policy did apply
    rerun = [r for r in data["rows"] if r.get("profile_rerun")]
    assert len(rerun) == 1 and rerun[0]["arm"] in arms
    text = prof.read_text()
    assert f"== {rerun[0]['arm']} bf16 x2 (best)" in text and "FSDP host work per step" in text


def _bench_module():
    import importlib

    sys.path.insert(0, str(BENCH.parent))
    try:
        return importlib.import_module("bench_distributed")
    finally:
        sys.path.remove(str(BENCH.parent))


@pytest.mark.skipif(not BENCH.is_file(), reason="bench/ is not part of this checkout")
def test_bench_profile_summary_splits_device_time_by_stream():
    """The CUDA branch of the profile tables, on made-up events (CI has no GPU to profile)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import Interval

    bench = _bench_module()

    def ev(name, stream, start, end, device=DeviceType.CUDA, **kw):
        return SimpleNamespace(
            name=name, key=name, device_type=device, device_resource_id=stream, time_range=Interval(start, end),
            cpu_time_total=end - start, count=1, self_device_time_total=end - start, **kw,
        )  # fmt: skip

    events = [
        ev("nvjet_gemm", 7, 0, 4000),
        ev("nvjet_gemm", 7, 3000, 6000),  # overlapping: 6 ms busy
        ev("split_with_sizes_copy_kernel", 7, 7000, 8000),  # FSDP2's copy-out on the compute stream
        ev("ncclDevKernel_AllGather", 20, 1000, 9000),
        ev("FSDP::all_gather", 20, 0, 9000, is_user_annotation=True),  # a GPU range, not device work
        ev("FSDP::pre_forward (model.layers.0)", None, 0, 500, device=DeviceType.CPU),
        ev("FSDP::pre_forward (model.layers.1)", None, 600, 900, device=DeviceType.CPU),
    ]
    prof = SimpleNamespace(events=lambda: events, key_averages=lambda: events)
    text = "\n".join(bench.profile_summary(prof, "arm bf16 x2", wall_ms=10.0, steps=1))
    assert "compute stream idle 3.0 ms of 10.0" in text  # 7 ms busy (gemms + copy-out) of 10
    assert "busy beside NCCL kernels 6.0 ms" in text  # gemms 1-6 ms and the copy-out 7-8 ms, NCCL 1-9 ms
    assert "FSDP2 copy-out on it 1.00 ms" in text
    assert "8.00        1  NCCL" in text
    assert "FSDP::all_gather" not in text  # the annotation was not counted as a kernel
    assert "FSDP::pre_forward" in text and "0.80" in text  # 2 calls, 0.8 ms of host time
    assert bench._union_ms([(0, 4000), (3000, 6000), (7000, 8000)]) == 7.0


@pytest.mark.skipif(not BENCH.is_file(), reason="bench/ is not part of this checkout")
def test_bench_summary_names_the_best_layouts_and_applies_the_defaults_rule():
    bench = _bench_module()

    def row(arm, quant, gpus, tok, peak=10.0):
        return dict(arm=arm, quant=quant, gpus=gpus, tokens_per_s=tok, peak_gib=peak)

    rows = [row("single", q, 1, 100.0) for q in ("bf16", "nf4")]
    rows += [row("fsdp2", q, 2, 150.0) for q in ("bf16", "nf4")]
    rows += [row("fsdp2-g2", "bf16", 2, 160.0), row("fsdp2-g2", "nf4", 2, 151.0)]  # +6.7 %, +0.7 %: no
    rows += [row("fsdp2-emb", q, 2, 156.0, peak=10.5) for q in ("bf16", "nf4")]  # +4 % on both: adopt
    rows += [row("fsdp2-lrepl", q, 2, 160.0, peak=11.5) for q in ("bf16", "nf4")]  # +1.5 GiB: no
    rows += [row("fsdp2-repl-1", "bf16", 2, 176.0), row("fsdp2-repl-1", "nf4", 2, 166.0)]
    bench.add_efficiency(rows)
    text = "\n".join(bench.summarize(rows))
    assert "(sharded base), bf16 x2: fsdp2-g2 80.0% of 2 x single (misses 85%)" in text
    assert "(any base), bf16 x2: fsdp2-repl-1 88.0% of 2 x single (meets 85%)" in text
    assert "default blocks_per_unit=2: keep off (fsdp2-g2 vs fsdp2: bf16 +6.7%, nf4 +0.7%" in text
    assert "default keep_embeddings=True: ADOPT" in text
    assert 'default lora="replicate": keep off' in text and "peak +1.50 GiB" in text
    assert "default blocks_per_unit=2 + keep_embeddings=True: not decided" in text


@pytest.mark.skipif(not BENCH.is_file(), reason="bench/ is not part of this checkout")
def test_bench_deadline_skips_an_arm_that_would_end_past_it(one_rank_group):
    bench = _bench_module()
    cpu = torch.device("cpu")
    assert bench.Deadline(None, cpu).allows()
    deadline = bench.Deadline(time.time() + 30, cpu)
    assert deadline.allows()  # nothing measured yet
    deadline.took(10.0)
    assert deadline.allows()
    deadline.took(40.0)  # the next arm, estimated as long as the longest so far, would end too late
    assert not deadline.allows()
