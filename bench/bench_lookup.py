"""The dequantisation kernel's choices: 4-bit code lookup x tile config (``dequant_4bit(lookup=, block=)``).

For NF4 with double quantisation (blocksize 64, built by ``fastlora.quant.quantize_4bit``; same bytes
as bitsandbytes) and (N, K) in {(4096, 4096), (14336, 4096), (4096, 14336)}, every lookup in
``fastlora.kernels.NF4_LOOKUPS`` and every tile config in ``BLOCKS`` is checked ``torch.equal``
against ``fastlora.quant.dequantize`` (pure PyTorch, bit-exact to bnb) and timed (median of
``triton.testing.do_bench``, L2 cleared before every call); GB/s counts packed + output bytes. The
library launches one fixed (lookup, config): this is how it was picked. Prints a table, writes JSON.

    python -P bench/bench_lookup.py --out lookup.json      # CUDA GPU
    python -P bench/bench_lookup.py --smoke                # CPU interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

import torch

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))  # (N, K)
BLOCKS = ((64, 64, 4), (32, 64, 4), (128, 64, 8), (16, 256, 4), (32, 128, 4), (64, 128, 8))  # BLOCK_R, BLOCK_K, warps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny shapes: checks the script runs")
    ap.add_argument("--lookups", nargs="+", default=None, help="only these lookups")
    ap.add_argument("--shapes", type=int, default=len(SHAPES), help="only the first SHAPES shapes")
    ap.add_argument("--out", type=str, default=str(Path(__file__).parent / "results" / "lookup.json"))
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("bench_lookup: needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    from fastlora.kernels import NF4_LOOKUPS, dequant_4bit

    from fastlora.quant import dequantize, quantize_4bit

    dev = "cpu" if args.smoke else "cuda"
    shapes = ((40, 72),) if args.smoke else SHAPES[: args.shapes]
    blocks = BLOCKS[:1] if args.smoke else BLOCKS

    def bench(fn):
        if args.smoke:
            fn()
            return float("nan")
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    rows = []
    for n, k in shapes:
        qw = quantize_4bit(torch.randn(n, k, device=dev), blocksize=64, compress_statistics=True)
        ref = dequantize(qw, torch.bfloat16)
        nbytes = qw.packed.numel() + 2 * n * k
        for lookup in args.lookups or NF4_LOOKUPS:
            for block in blocks:

                def run(lookup=lookup, block=block, qw=qw):
                    return dequant_4bit(qw.packed, qw.absmax, "nf4", qw.shape, 64, torch.bfloat16, absmax2=qw.absmax2,
                                        code2=qw.code2, offset=qw.offset, lookup=lookup, block=block)  # fmt: skip

                equal = torch.equal(run(), ref)
                ms = bench(run)
                rows.append(dict(N=n, K=k, lookup=lookup, block=list(block), equal=equal, ms=ms,
                                 GBps=nbytes / (ms * 1e-3) / 1e9))  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                gpu=torch.cuda.get_device_name() if dev == "cuda" else "cpu (smoke)", torch=torch.__version__)  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    for n, k in shapes:
        best = min((r for r in rows if (r["N"], r["K"]) == (n, k)), key=lambda r: r["ms"])
        print(f"{n}x{k}: best {best['lookup']} {best['block']} {best['ms'] * 1e3:.1f} us ({best['GBps']:.0f} GB/s); "
              f"all equal to bnb: {all(r['equal'] for r in rows if (r['N'], r['K']) == (n, k))}")  # fmt: skip
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
