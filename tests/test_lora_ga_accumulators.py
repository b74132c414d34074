"""fastlora.lora_ga.accumulators: the host accumulator's workers, back-pressure and errors."""

from __future__ import annotations

import pytest
import torch

from fastlora.lora_ga import DenseAccumulator, HostAccumulator


@pytest.mark.parametrize("workers", [1, 3])
def test_host_accumulator_worker_backpressure_and_errors(workers):
    shapes = {"a": (3, 5), "b": (4, 5), "c": (2, 5)}
    acc = HostAccumulator(shapes, max_inflight=1, workers=workers)
    dense = DenseAccumulator(shapes)
    try:
        for _i in range(20):
            x = torch.randn(7, 5)
            for name, (n_out, _) in shapes.items():
                dy = torch.randn(7, n_out)
                acc.add(name, x, dy)
                dense.add(name, x, dy)
        acc.flush()
        for name in shapes:
            torch.testing.assert_close(acc.state()[name], dense.state()[name], rtol=1e-5, atol=1e-5)
        assert acc.updates == {"a": 20, "b": 20, "c": 20}
        acc.add("a", torch.randn(7, 5), torch.randn(7, 4))  # wrong shape: fails in the worker
        with pytest.raises(RuntimeError, match="host gradient accumulation failed"):
            acc.flush()
    finally:
        acc.close()
