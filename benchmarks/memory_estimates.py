"""The memory guard's estimates against the measured peak of each method: measured / estimate per case.

    python -m benchmarks.memory_estimates            # the grid below, about a minute on the CPU machine
    python -m benchmarks.memory_estimates --quick    # one shape per method

The peak is the resident high-water mark of one `ld.attention` call in a fresh process whose allocator returns
every freed block of 64 KiB or more (leetdecoding/bench/memory.py, `measure_cases`); the estimate is what the
dispatcher plans (`dispatch.estimate_bytes`: the method's `extra_memory_bytes`, the output and the final state).
Every ratio must be at most 1 (an estimate below the peak lets the guard accept a plan that runs out of memory).
"""

from __future__ import annotations

import argparse

from leetdecoding.bench.memory import measure_cases

SHAPES = {  # (B, H, N, Dk, Dv): tens to hundreds of MiB, so that allocator noise is small
    "vanilla": [(1, 2, 3000, 8, 8), (2, 4, 1500, 64, 64), (1, 8, 1024, 128, 128)],
    "recurrent": [(2, 4, 3000, 64, 64), (8, 8, 300, 128, 128)],
    "chunked": [(2, 4, 20000, 64, 64), (1, 8, 8192, 128, 128), (4, 2, 3001, 16, 48)],
    "recursion": [(2, 4, 20000, 64, 64), (1, 8, 5000, 128, 32)],
    "fleet": [(1, 4, 100000, 16, 16), (2, 4, 20000, 64, 64)],
}
FLAGS = [{}, {"initial_state": True, "output_final_state": True}, {"grad": True}]
DTYPE_NAMES = ["fp32", "bf16", "fp64"]


def cases(quick: bool) -> list[dict]:
    out = []
    for method, shapes in SHAPES.items():
        for shape in shapes[:1] if quick else shapes:
            for dtype in DTYPE_NAMES[:1] if quick else DTYPE_NAMES:
                for flags in FLAGS:
                    if flags.get("grad") and method == "fleet":
                        continue  # no gradient support
                    if flags.get("grad") and method == "recurrent" and shape[2] * shape[0] > 3000:
                        continue  # the per-token backward graph is slow to build, not large
                    out.append({"method": method, "shape": list(shape), "dtype": dtype, **flags})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape and dtype per method")
    args = parser.parse_args()
    print(f"{'method':10s} {'(B, H, N, Dk, Dv)':24s} {'dtype':5s} {'flags':22s} {'peak MiB':>9s} "
          f"{'est. MiB':>9s} {'ratio':>6s}")  # fmt: skip
    worst: dict[str, float] = {}
    for r in measure_cases(cases(args.quick)):
        flags = ",".join(f for f in ("initial_state", "output_final_state", "grad") if r.get(f)) or "-"
        if r["peak"] is None:
            print(f"{r['method']:10s} {str(tuple(r['shape'])):24s} {r['dtype']:5s} {flags:22s} not measurable here")
            continue
        ratio = r["peak"] / r["estimate"]
        worst[r["method"]] = max(worst.get(r["method"], 0.0), ratio)
        print(f"{r['method']:10s} {str(tuple(r['shape'])):24s} {r['dtype']:5s} {flags:22s} "
              f"{r['peak'] / 2**20:9.1f} {r['estimate'] / 2**20:9.1f} {ratio:6.2f}", flush=True)  # fmt: skip
    print("largest measured / estimate per method: " + ", ".join(f"{m} {w:.2f}" for m, w in worst.items()))


if __name__ == "__main__":
    main()
