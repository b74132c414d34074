"""Where the per-batch contributions ``dYᵀ·x`` of the target layers are summed.

The estimation loop (:mod:`fastlora.lora_ga.estimate`) calls ``add(name, x, dy)`` from its backward
hooks and knows nothing else about an accumulator: :class:`DenseAccumulator` keeps fp32 sums beside
the layers, :class:`HostAccumulator` in host memory fed from a side CUDA stream, and the sketches of
:mod:`fastlora.lora_ga.sketch` keep only randomized sketches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Mapping

import torch

from .products import outer_fp32

__all__ = ["DenseAccumulator", "GradientAccumulator", "HostAccumulator"]


class GradientAccumulator:
    """Where the per-batch contributions ``dYᵀ·x`` of every target layer are summed.

    Subclasses implement :meth:`add`; :meth:`state` returns the tensors to all-reduce (summed
    across ranks), and :meth:`result` turns the sums into what :class:`GradientEstimate` holds.
    ``add`` is called from autograd's backward thread: it must not block for long.
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        self.shapes = dict(shapes)
        self.updates = dict.fromkeys(self.shapes, 0)

    def add(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        """Add ``dyᵀ·x`` (``x [M, in]``, ``dy [M, out]``) to layer ``name``'s sum."""
        raise NotImplementedError

    def flush(self) -> None:
        """Wait until every ``add`` so far is reflected in :meth:`state`."""

    def close(self) -> None:
        """Release threads / streams (called once, also on errors)."""

    def state(self) -> dict[str, torch.Tensor]:
        """The sums, keyed by layer name, or ``"name\0part"`` for a layer with several (all-reduced in
        place across ranks when distributed)."""
        raise NotImplementedError

    def nonfinite_layers(self) -> list[str]:
        """Names of the layers whose sums hold NaN/inf, in order (after :meth:`flush`)."""
        bad: list[str] = []
        for key, t in self.state().items():
            name = key.split("\0", 1)[0]
            if name not in bad and not bool(torch.isfinite(t).all()):
                bad.append(name)
        return bad

    def result(self, num_batches: int) -> dict[str, torch.Tensor]:
        """Averaged gradients ``sum / num_batches``, fp32 ``[out, in]``, by layer name."""
        out = {}
        for name, total in self.state().items():
            out[name] = total.div_(num_batches)
        return out


class DenseAccumulator(GradientAccumulator):
    """fp32 accumulators on ``device`` (default: each layer's own device), updated in place."""

    def __init__(
        self,
        shapes: Mapping[str, tuple[int, int]],
        devices: Mapping[str, torch.device] | torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(shapes)
        self._sums: dict[str, torch.Tensor] = {}
        for name, (n_out, n_in) in self.shapes.items():
            dev = devices.get(name) if isinstance(devices, Mapping) else devices
            self._sums[name] = torch.zeros(n_out, n_in, dtype=dtype, device=dev)

    def add(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        acc = self._sums[name]
        if acc.device != x.device:
            acc.add_(outer_fp32(dy, x).to(acc.device))
        else:
            outer_fp32(dy, x, out=acc)
        self.updates[name] += 1

    def state(self) -> dict[str, torch.Tensor]:
        return self._sums


class HostAccumulator(GradientAccumulator):
    """fp32 accumulators in host memory, so the device holds only a few layers' partials at a time.

    On CUDA each ``add`` computes the partial ``dYᵀ·x`` on the device (compute stream); a side stream
    waits for it, copies it into a pinned staging buffer and records an event; a host worker thread
    waits on that event and adds the buffer into the layer's host sum. The compute stream never
    waits for a copy. At most ``max_inflight`` partials exist at once (the backward thread blocks
    for a free staging buffer beyond that), which bounds device memory to that many layers'
    partials. Only the staging buffers are pinned: the sums themselves are ordinary memory (pinning
    26 GiB of sums for a 7B model would starve the host), and each layer's sum is created by its
    first partial (a copy instead of zero-fill plus add).

    ``workers`` host threads share the adds (each layer always goes to the same thread, so no sum is
    written by two threads); the rate of these adds -- host memory bandwidth, three fp32 passes per
    partial -- is what bounds this accumulator's speed. On an H100 host (16 cores) one worker thread
    added at 73 GB/s against 131 GB/s from the main thread, and 4 workers took a 4-layer 8B-shaped
    NF4 estimate from 0.258 to 0.198 s/batch (bench/NOTES.md), hence the default.

    On a CPU-only machine the partial is already in host memory: it goes straight to the workers,
    through the same queues and the same bound (so this logic is exercised on CPU too).
    """

    def __init__(self, shapes: Mapping[str, tuple[int, int]], *, max_inflight: int = 3, workers: int = 4) -> None:
        super().__init__(shapes)
        if max_inflight < 1 or workers < 1:
            raise ValueError("fastlora: max_inflight and workers must be >= 1")
        # Pinned memory needs a CUDA driver; on CPU-only builds plain memory is the host memory.
        self._pin = torch.cuda.is_available()
        self._sums: dict[str, torch.Tensor] = {}
        self._max_numel = max((o * i for o, i in self.shapes.values()), default=0)
        self._free: queue.Queue[torch.Tensor] = queue.Queue()
        self._slots = threading.BoundedSemaphore(max_inflight)
        self._error: BaseException | None = None
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._owner = {name: i % workers for i, name in enumerate(self.shapes)}
        self._queues: list[queue.Queue[tuple | None]] = [queue.Queue() for _ in range(workers)]
        self._workers = [
            threading.Thread(target=self._run, args=(q,), name=f"fastlora-host-accumulator-{i}", daemon=True)
            for i, q in enumerate(self._queues)
        ]
        for w in self._workers:
            w.start()

    def _staging(self) -> torch.Tensor:
        # Created lazily (only CUDA needs them); never more than max_inflight exist.
        try:
            return self._free.get_nowait()
        except queue.Empty:
            return torch.empty(self._max_numel, dtype=torch.float32, pin_memory=self._pin)

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device=device)
        return self._streams[device]

    def add(self, name: str, x: torch.Tensor, dy: torch.Tensor) -> None:
        self._raise_pending()
        self._slots.acquire()  # back-pressure: at most max_inflight partials alive
        try:
            part = outer_fp32(dy, x)
            if part.device.type == "cuda":
                compute = torch.cuda.current_stream(part.device)
                side = self._side_stream(part.device)
                stage = self._staging()
                buf = stage[: part.numel()].view(part.shape)
                side.wait_stream(compute)  # the partial is complete before it is copied
                with torch.cuda.stream(side):
                    buf.copy_(part, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(side)
                # The partial was allocated on the compute stream: keep the allocator from reusing
                # its memory until the side stream's copy has read it.
                part.record_stream(side)
                item = (name, buf, done, stage)
            else:
                item = (name, part, None, None)
            self._queues[self._owner[name]].put(item)
            self.updates[name] += 1
        except BaseException:
            self._slots.release()
            raise

    def _run(self, work: queue.Queue) -> None:
        while True:
            item = work.get()
            if item is None:
                work.task_done()
                return
            name, buf, done, stage = item
            try:
                if self._error is None:
                    if done is not None:
                        done.synchronize()
                    total = self._sums.get(name)
                    if total is None:
                        # the first partial becomes the sum (a staged one is copied out of its buffer)
                        self._sums[name] = buf if stage is None else buf.clone()
                    else:
                        total.add_(buf)
            except BaseException as exc:  # surfaced on the next add / flush
                self._error = exc
            finally:
                if stage is not None:
                    self._free.put(stage)
                self._slots.release()
                work.task_done()

    def _raise_pending(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise RuntimeError(f"fastlora: host gradient accumulation failed: {exc}") from exc

    def flush(self) -> None:
        for q in self._queues:
            q.join()
        self._raise_pending()

    def close(self) -> None:
        for q, w in zip(self._queues, self._workers):
            if w.is_alive():
                q.put(None)
                w.join()

    def state(self) -> dict[str, torch.Tensor]:
        for name, (n_out, n_in) in self.shapes.items():
            if name not in self._sums:  # a layer no batch reached
                self._sums[name] = torch.zeros(n_out, n_in, dtype=torch.float32)
        return {name: self._sums[name] for name in self.shapes}
