"""Kill ``save_adapter`` at random points, many times, and check what a reader finds after each kill.

Run by tests/test_adapter.py::test_save_survives_sigkill as ``python save_kill_worker.py FOLDER KILLS SEED``.
A forked child saves two different adapters (other ranks, other targets, so other configs) into
FOLDER in turn, forever; the parent SIGKILLs it after a random delay, then reads FOLDER. Prints
one JSON line: kills, how many found each adapter, the most temp files ever left, problems.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch

import fastlora
from fastlora.adapter import _TEMP, _read_adapter


def _model(targets: list[str], r: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 1024))
    fastlora.patch(model, r=r, alpha=2 * r, target_modules=targets)
    for layer in fastlora.lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B)
    return model


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, layer in fastlora.lora_layers(model).items():
        out[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A.detach()
        out[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B.detach()
    return out


def main() -> None:
    folder, kills, seed = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    models = [_model(["0"], 32, 1), _model(["0", "1"], 64, 2)]
    expected = [(_tensors(m), {"r": r}) for m, r in zip(models, (32, 64))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("keep me")
    fastlora.save_adapter(models[0], folder)
    found, most_temps, problems = [0, 0], 0, []
    for k in range(kills):
        pid = os.fork()
        if pid == 0:  # the child: save, save, save ... until killed
            i = k
            while True:
                fastlora.save_adapter(models[i % 2], folder)
                i += 1
        time.sleep(rng.uniform(0.0, 0.06))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        temps = [p.name for p in folder.iterdir() if _TEMP.match(p.name)]
        most_temps = max(most_temps, len(temps))
        if (folder / "notes.txt").read_text() != "keep me":
            problems.append(f"kill {k}: notes.txt changed")
        try:
            config, state, _ = _read_adapter(folder)
        except Exception as exc:
            problems.append(f"kill {k}: {type(exc).__name__}: {exc}")
            continue
        match = [
            i
            for i, (tensors, cfg) in enumerate(expected)
            if config["r"] == cfg["r"]
            and state.keys() == tensors.keys()
            and all(torch.equal(state[key], tensors[key]) for key in tensors)
        ]
        if len(match) != 1:
            problems.append(f"kill {k}: the adapter is neither one (r={config.get('r')}, keys={sorted(state)[:2]})")
        else:
            found[match[0]] += 1
    fastlora.save_adapter(models[1], folder)  # the next save removes every dead save's temp files
    left = [p.name for p in folder.iterdir() if _TEMP.match(p.name)]
    print(
        json.dumps({"kills": kills, "found": found, "most_temps": most_temps, "left_after": left, "problems": problems})
    )


if __name__ == "__main__":
    main()
