"""GPU timings of the Triton methods against fla, transformers' MiniMax loop and the torch chunked method, on one
GPU in one run (called by benchmarks/gpu_check.sh after the GPU tests).

    python -m benchmarks.gpu_bench                 # B=1, H=32, D=128, N in {1024, 4096, 16384, 65536}, bf16 + fp32
    python -m benchmarks.gpu_bench --n 1024,4096   # fewer lengths

Prefill: triton_chunked forward and forward + backward (and its "fast" precision), fla's chunk_simple_gla,
transformers' MiniMax prefill loop and leetdecoding's torch `chunked`, all with the MiniMax decays and
scale D^-0.5. Decode: one token at B in {1, 64}: the fused Triton decode step (state updated in place) against
leetdecoding.decode_step (torch), fla's fused_recurrent_simple_gla and transformers' MiniMax cache path.

Every output (and, up to N = 16384, every gradient) is compared with an fp64 computation before anything is
timed, by leetdecoding.methods.naive's measure (max |err| / the magnitude of the summed terms); a row whose error
exceeds its dtype's TOLERANCE (rows that round operands on purpose: `rounded_operand_tolerance`) is marked WRONG
and no speed-up is printed for it. Optional competitors (fla, transformers) that fail to import are skipped with
a note. Times are medians of CUDA-event timings after warm-up; TFLOP/s counts the chunked algorithm's useful
work, GB/s the decode step's state traffic.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import traceback

import torch

import leetdecoding as ld
from leetdecoding.bench.sweep import fp64_gradients, fp64_sums
from leetdecoding.methods import REGISTRY
from leetdecoding.methods.naive import TOLERANCE, reference, relative_error, rounded_operand_tolerance

GRAD_CHECK_MAX_N = 16384
DECODE_STEPS = 50


def bound(dtype, name: str) -> float:
    """The largest relative_error accepted: the contract's TOLERANCE for exact rows (triton_chunked's default
    "accurate", the torch methods); rows that round an fp32 operand to TF32 / bf16 on purpose (our "fast", fla,
    transformers' loop on a GPU) get naive.rounded_operand_tolerance, derived from the same table."""
    rounded = "fast" in name or "fla" in name or "transformers" in name
    return rounded_operand_tolerance(dtype) if rounded else TOLERANCE[dtype]


def cuda_time(fn, budget_s: float = 0.5, max_reps: int = 30, warmup: int = 2) -> tuple[float, float]:
    """(median, interquartile range) in ms of `fn` timed with CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    spent = 0.0
    while len(times) < max_reps and (spent < budget_s * 1e3 or len(times) < 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        spent += times[-1]
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return statistics.median(times), q[2] - q[0]


def try_import_fla():
    try:
        from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

        return chunk_simple_gla, fused_recurrent_simple_gla, None
    except Exception as e:  # noqa: BLE001 - any failure means "no fla row"
        return None, None, f"{type(e).__name__}: {e}"


def fla_call(fn, q, k, v, log_decay, scale, initial_state=None, output_final_state=False):
    """fla's simple GLA on (B, T, H, D) inputs with a per-head constant log decay: `g_gamma` where this fla
    version has it, else the same decay as a per-token gate `g`."""
    try:
        return fn(q, k, v, g_gamma=log_decay, scale=scale, initial_state=initial_state,
                  output_final_state=output_final_state)  # fmt: skip
    except TypeError:
        g = log_decay.view(1, 1, -1).expand(q.shape[0], q.shape[1], -1).contiguous()
        return fn(q, k, v, g=g, scale=scale, initial_state=initial_state, output_final_state=output_final_state)


def minimax_module(heads: int, dim: int, dtype, q, k, v):
    """transformers' MiniMaxLightningAttention reduced to its attention core, fed q, k, v; (module, hidden)."""
    from benchmarks.common import Constant, minimax_core

    module = minimax_core(heads, dim).to(device="cuda", dtype=dtype)
    b, h, n, d = q.shape
    qkv = torch.cat([t.transpose(1, 2) for t in (q, k, v)], dim=-1).reshape(b, n, h * 3 * d).contiguous()
    module.qkv_proj = Constant(qkv)
    module.output_gate = Constant(torch.full((b, n, h * d), 40.0, dtype=dtype, device="cuda"))  # sigmoid = 1
    return module, torch.zeros(b, n, 1, dtype=dtype, device="cuda")


class Table:
    def __init__(self, title: str, columns: list[tuple[str, int]]):
        self.columns = columns
        print(f"\n## {title}")
        print(" ".join(f"{c:>{w}s}" for c, w in columns))

    def row(self, *values) -> None:
        cells = []
        for (_, w), v in zip(self.columns, values):
            cells.append(f"{v:>{w}.3g}" if isinstance(v, float) else f"{str(v):>{w}s}")
        print(" ".join(cells), flush=True)


def prefill(n_values, heads, dim, dtypes, fla_chunk, notes) -> list[dict]:
    table = Table(
        f"prefill B=1 H={heads} D={dim}, MiniMax decays, scale D^-0.5 (ms: median of CUDA-event timings)",
        [("dtype", 8), ("N", 6), ("method", 26), ("pass", 8), ("ms", 9), ("iqr", 7), ("TFLOP/s", 8),
         ("rel.err", 8), ("status", 6), ("auto", 15)],
    )  # fmt: skip
    results = []
    for dtype in dtypes:
        for n in n_values:
            results += prefill_case(table, n, heads, dim, dtype, fla_chunk, notes)
            torch.cuda.empty_cache()
    return results


def prefill_case(table, n, heads, dim, dtype, fla_chunk, notes) -> list[dict]:
    log_decay = ld.decay.minimax(heads, 0, 12).cuda()
    scale = dim**-0.5
    torch.manual_seed(n)
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", dtype=dtype) for _ in range(3))
    do = torch.randn_like(q)
    flops = 2.0 * heads * n * (64 * 2 * dim + 2 * dim * dim)  # the chunked algorithm's work, C = 64
    auto = ld.explain(q, k, v, log_decay=log_decay, scale=scale).method
    ref = fp64_sums(q, k, v, log_decay, scale)
    ref_grads = fp64_gradients(q, k, v, log_decay, scale, do) if n <= GRAD_CHECK_MAX_N else None

    def ours(q, k, v, method="triton_chunked", precision=None):
        if precision is None:
            return ld.attention(q, k, v, log_decay=log_decay, scale=scale, method=method)
        x = ld.inputs.validate(q, k, v, log_decay=log_decay, scale=scale)
        return REGISTRY[method].forward(x, chunk_size=64, precision=precision)[0]

    def fla(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        return fla_call(fla_chunk, q, k, v, log_decay, scale)[0].transpose(1, 2)

    qf, kf, vf = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))  # fla wants (B, T, H, D)
    fwd_cases = {
        "triton_chunked": lambda: ours(q, k, v),
        "triton_chunked fast": lambda: ours(q, k, v, precision="fast"),
        "torch chunked": lambda: ours(q, k, v, "chunked"),
    }
    if fla_chunk is not None:
        fwd_cases["fla chunk_simple_gla"] = lambda: fla(qf, kf, vf)
    try:
        module, hidden = minimax_module(heads, dim, dtype, q, k, v)
        fwd_cases["transformers MiniMax loop"] = lambda: (
            module(hidden, None, None)[0].view(1, n, heads, dim).transpose(1, 2)
        )
    except Exception as e:  # noqa: BLE001 - optional competitor
        notes.add(f"transformers MiniMax loop skipped: {type(e).__name__}: {e}")
    refs = {name: ref for name in fwd_cases}
    if "transformers MiniMax loop" in fwd_cases:
        # its own decays (rounded to its dtype with the module) and no scale: compared with its own reference
        refs["transformers MiniMax loop"] = fp64_sums(q, k, v, -module.slope_rate.reshape(-1))
    rows = [measure(table, dtype, n, name, "fwd", fn, refs[name], None, flops, auto) for name, fn in fwd_cases.items()]
    del refs

    def fwd_bwd(fn, inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]

        def run():
            for t in leaves:
                t.grad = None
            fn(*leaves).backward(do)
            return [t.grad for t in leaves]

        return run

    bwd_cases = {
        "triton_chunked": fwd_bwd(ours, (q, k, v)),
        "torch chunked": fwd_bwd(lambda a, b, c: ours(a, b, c, "chunked"), (q, k, v)),
    }
    if fla_chunk is not None:
        bwd_cases["fla chunk_simple_gla"] = fwd_bwd(fla, (qf, kf, vf))
    for name, fn in bwd_cases.items():
        rows.append(measure(table, dtype, n, name, "fwd+bwd", fn, None, ref_grads, 3 * flops, auto))
    return rows


def measure(table, dtype, n, name, mode, fn, ref, ref_grads, flops, auto) -> dict:
    row = {"dtype": str(dtype).replace("torch.", ""), "n": n, "method": name, "pass": mode}
    try:
        out = fn()
        if ref is not None:
            err = relative_error(out, *ref)
        elif ref_grads is not None:
            err = max(relative_error(g, *r) for g, r in zip(out, ref_grads))
        else:
            err = float("nan")
        del out
        ok = not err > bound(dtype, name)
        ms, iqr = cuda_time(fn)
        row.update(ms=ms, iqr=iqr, tflops=flops / ms / 1e9, err=err, status="ok" if ok else "WRONG")
    except Exception as e:  # noqa: BLE001 - a failing competitor is a row, not the end of the run
        row.update(ms=float("nan"), iqr=float("nan"), tflops=float("nan"), err=float("nan"), status="FAIL")
        print(f"# {name} {mode} N={n} {dtype}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        if "triton" in name:
            traceback.print_exc()
    table.row(row["dtype"], n, name, mode, row["ms"], row["iqr"], row["tflops"], row["err"], row["status"], auto)
    torch.cuda.empty_cache()
    return row


def decode(batches, heads, dim, dtypes, fla_recurrent) -> list[dict]:
    table = Table(
        f"decode: one token, H={heads} D={dim}, fp32 state; ms per token (median of {DECODE_STEPS}-token loops)",
        [("dtype", 8), ("B", 4), ("method", 30), ("ms/token", 9), ("state GB/s", 10), ("rel.err", 8), ("status", 6)],
    )
    results = []
    for dtype in dtypes:
        for b in batches:
            results += decode_case(table, b, heads, dim, dtype, fla_recurrent)
    return results


def decode_case(table, b, heads, dim, dtype, fla_recurrent) -> list[dict]:
    from leetdecoding.methods import triton as triton_methods

    log_decay = ld.decay.minimax(heads, 0, 12).cuda()
    scale = dim**-0.5
    torch.manual_seed(b)
    q, k, v = (torch.randn(b, heads, dim, device="cuda", dtype=dtype) for _ in range(3))
    state = torch.randn(b, heads, dim, dim, device="cuda")
    one = reference(q[:, :, None], k[:, :, None], v[:, :, None], log_decay.double().exp(), state, scale)  # on CPU
    ref = one.o[:, :, 0], one.o_abs[:, :, 0]
    traffic = 2 * state.numel() * 4  # the fp32 state read and written once per token
    buf = state.clone()
    cases = {
        "triton decode_step (in place)": lambda: triton_methods.decode_step(q, k, v, buf, log_decay, scale, buf)[0],
        "leetdecoding.decode_step torch": lambda: ld.decode_step(
            q, k, v, buf, log_decay=log_decay, scale=scale, out_state=buf
        )[0],
    }
    if fla_recurrent is not None:
        qf, kf, vf = (t.unsqueeze(1) for t in (q, k, v))  # (B, 1, H, D)
        cases["fla fused_recurrent_simple_gla"] = lambda: fla_call(
            fla_recurrent, qf, kf, vf, log_decay, scale, initial_state=buf, output_final_state=True
        )[0][:, 0]
    rows = []
    for name, fn in cases.items():
        row = {"dtype": str(dtype).replace("torch.", ""), "b": b, "method": name}
        try:
            buf.copy_(state)
            err = relative_error(fn(), *ref)

            def loop(fn=fn):
                for _ in range(DECODE_STEPS):
                    fn()

            ms = cuda_time(loop, budget_s=0.3)[0] / DECODE_STEPS
            row.update(ms=ms, gbs=traffic / ms / 1e6, err=err, status="ok" if err <= bound(dtype, name) else "WRONG")
        except Exception as e:  # noqa: BLE001 - a failing competitor is a row, not the end of the run
            row.update(ms=float("nan"), gbs=float("nan"), err=float("nan"), status="FAIL")
            print(f"# {name} B={b}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        table.row(row["dtype"], b, name, row["ms"], row["gbs"], row["err"], row["status"])
        rows.append(row)
    return rows


def varlen(heads, dim, dtype, sequences: int = 64, longest: int = 2048) -> None:
    """Packed sequences in one triton_chunked call (one launch) against a loop of one call per sequence."""
    table = Table(
        f"varlen: {sequences} packed sequences of 1..{longest} tokens, H={heads} D={dim}, {dtype}",
        [("method", 34), ("ms", 9), ("rel.err", 8), ("status", 6)],
    )
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, longest + 1, (sequences,), generator=g)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).cuda()
    bounds = list(zip(cu.tolist(), cu.tolist()[1:]))
    log_decay = ld.decay.minimax(heads, 0, 12).cuda()
    q, k, v = (torch.randn(1, heads, int(cu[-1]), dim, device="cuda", dtype=dtype) for _ in range(3))
    sums = [fp64_sums(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], log_decay) for a, b in bounds]
    ref = [torch.cat(parts, 2) for parts in zip(*sums)]
    cases = {
        "triton_chunked, cu_seqlens": lambda: ld.attention(q, k, v, log_decay=log_decay, cu_seqlens=cu),
        "triton_chunked, one call per sequence": lambda: torch.cat(
            [ld.attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], log_decay=log_decay) for a, b in bounds], 2
        ),
    }
    for name, fn in cases.items():
        err = relative_error(fn(), *ref)
        table.row(name, cuda_time(fn)[0], err, "ok" if err <= bound(dtype, name) else "WRONG")


def summary(prefill_rows, decode_rows) -> None:
    print("\n## summary (speed-up = other / triton; only where both rows are correct)")
    index = {(r["dtype"], r["n"], r["method"], r["pass"]): r for r in prefill_rows}
    for (dtype, n, method, mode), r in index.items():
        ours = index.get((dtype, n, "triton_chunked", mode))
        if method == "triton_chunked" or ours is None:
            continue
        if ours["status"] == "ok" and r["status"] == "ok":
            print(f"{dtype:8s} N={n:<6d} {mode:8s} triton_chunked vs {method:26s}: {r['ms'] / ours['ms']:6.2f}x")
    dindex = {(r["dtype"], r["b"], r["method"]): r for r in decode_rows}
    for (dtype, b, method), r in dindex.items():
        ours = dindex.get((dtype, b, "triton decode_step (in place)"))
        if ours is None or r is ours:
            continue
        if ours["status"] == "ok" and r["status"] == "ok":
            print(f"{dtype:8s} B={b:<3d} decode   triton decode_step vs {method:30s}: {r['ms'] / ours['ms']:6.2f}x")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="1024,4096,16384,65536")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--batch", default="1,64", help="decode batch sizes")
    p.add_argument("--dtypes", default="bfloat16,float32")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: the GPU numbers are still to be measured (see tests/test_triton.py for CPU)")
    import triton

    print(f"# GPU check {datetime.datetime.now():%Y-%m-%d %H:%M}  device: {torch.cuda.get_device_name()}")
    print(f"# leetdecoding {ld.__version__}  torch {torch.__version__}  triton {triton.__version__}")
    fla_chunk, fla_recurrent, why = try_import_fla()
    notes: set[str] = set()
    if why:
        notes.add(f"fla rows skipped (import failed: {why})")
    else:
        import fla

        print(f"# fla {getattr(fla, '__version__', '?')}")
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    prefill_rows = prefill([int(x) for x in a.n.split(",")], a.heads, a.dim, dtypes, fla_chunk, notes)
    decode_rows = decode([int(x) for x in a.batch.split(",")], a.heads, a.dim, dtypes, fla_recurrent)
    varlen(a.heads, a.dim, dtypes[0])
    summary(prefill_rows, decode_rows)
    for note in sorted(notes):
        print(f"# note: {note}")


if __name__ == "__main__":
    main()
