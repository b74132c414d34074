"""pytest-benchmark entry for the layer benchmark (``pytest bench/test_bench_layer.py --benchmark-only``).

Times forward+backward of one r=16 LoRA layer for the same cases as ``bench_layer.py``; needs CUDA.
(Not collected by the default test run: ``testpaths`` is ``tests/``.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# bench_layer imports bench/common.py as the scripts do (``python bench/bench_layer.py`` puts bench/ on the path).
sys.path.insert(0, str(Path(__file__).parent))
_spec = importlib.util.spec_from_file_location("bench_layer", Path(__file__).with_name("bench_layer.py"))
bench_layer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_layer)

CASES = [(m, k, n) for (k, n) in bench_layer.SHAPES for m in (16, 4096)]
METHODS = ["floor", "peft_nf4", "peft_bf16", "fl_nf4", "fl_bf16"]


@pytest.fixture(scope="module")
def cases():
    return {}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("m", "k", "n"), CASES, ids=lambda v: str(v))
def test_layer_fwd_bwd(benchmark, cases, method, m, k, n):
    key = (m, k, n)
    if key not in cases:
        cases.clear()
        torch.cuda.empty_cache()
        cases[key] = bench_layer.Case(m, k, n)
    case = cases[key]
    if method == "floor":
        _, fb = case.floor()
    elif method.startswith("peft"):
        _, fb, _model = case.peft(method.endswith("nf4"))
    else:
        _, fb = case.fastlora(method.endswith("nf4"), "auto")
    fb()

    def run():
        fb()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=20, warmup_rounds=3)
