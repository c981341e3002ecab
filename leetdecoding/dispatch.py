"""The one place that chooses a method.

Each method answers `not_supported_reasons(inputs)`; this module adds the memory check, walks a priority list
and returns the first method with no reasons, or raises one error naming every method and its reasons.
A forced method goes through the same check. Performance heuristics live here only, as named constants.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from . import tuning
from .inputs import AttentionInputs
from .memo import tracing
from .methods import REGISTRY, Method

ENV_METHOD = "LEETDECODING_METHOD"  # forces the method used when a call says method="auto"

# Defaults. `leetdecoding tune` measures VANILLA_MAX_N and the chunk sizes on a machine and writes a table
# (leetdecoding/tuning.py) whose values replace these for that device and dtype.
#
# Up to this length the quadratic form is a single matmul and beats the chunked scan on CPU (H = 8, D = 128, fp32,
# 2026-11-30: `leetdecoding tune --dry-run` at N = 256 vanilla 1.51 ms, chunked 1.72 ms, at N = 512 22.4 against
# 3.1 ms; `leetdecoding bench` at N = 256: 1.28 against 1.36 ms).
VANILLA_MAX_N = 256
# Chunk size of the chunked method: the intra-chunk quadratic work (N C (Dk + Dv)) against the per-chunk cost of
# the state (a few small products and passes per chunk); measured with `python -m benchmarks.chunk_size` (H=8,
# N=16384, fp32 and bf16, the CPU machine of 2026-11-30, two runs): at D=128, C=64 beat 32 and 128 by 6-30%; at
# D=256, 64 and 128 tie; at D=64, C=128 beat 64 by 10-28% in three of four measurements (fp32 once 5% slower).
CHUNK_SIZE = 64
CHUNK_SIZE_SMALL_HEAD = 128
SMALL_HEAD_DIM = 64
# On CPU, a decay factor lambda^j just above the smallest normal number `tiny` makes its products with ordinary
# inputs subnormal, which CPUs compute many times slower. Factors below tiny are exactly 0 and cost nothing, and
# flushing larger ones would lose terms the dtype holds, so the chunk is halved instead while some head has more
# than SUBNORMAL_MAX_POWERS powers below the chunk length within SUBNORMAL_BAND of tiny. Measured with
# `python -m benchmarks.subnormal_decays` (N=4096, D=128, against decay 0.9 at chunks of 128): lambda = 0.5 at
# C=128 (lambda^118 .. lambda^126 in the band) 2.83x, at the chosen C=64 0.94x; two powers in the band (0.1 at
# C=64) 2.28x, at the chosen C=32 1.05x; one power (0.01 at C=128, 1e-6) 1.20x, no better at any chunk size.
SUBNORMAL_BAND = 2.0**8
SUBNORMAL_MAX_POWERS = 1
SUBNORMAL_MIN_CHUNK = 16
# With gradients, chunked's forward keeps one state per segment of chunks, and its backward recomputes the
# chunk-start states of one segment into a buffer of this size (16 chunks of 64 at B=1, H=8, D=128 fp32):
# larger keeps fewer states and recomputes into a larger buffer. Without gradients it changes nothing.
SEGMENT_BYTES = 8 << 20
# The Triton kernels (leetdecoding/methods/triton): on CUDA they come first, in this order. triton_chunked's
# chunk and the accuracy of its dots with an fp32 operand ("accurate": about fp32, within the contract's
# tolerance; "ieee" is exact and slower; "fast" rounds that operand to the input dtype as fla does).
# Not yet measured on a GPU: benchmarks/gpu_check.sh times them against fla and the torch methods.
TRITON_FIRST_ON_CUDA = ["triton_chunked", "triton_recurrent", "triton_fleet"]
TRITON_CHUNK_SIZE = 64
TRITON_PRECISION = "accurate"
# The values `leetdecoding tune` may replace (leetdecoding/tuning.py), with their defaults.
TUNABLE = {
    "vanilla_max_n": VANILLA_MAX_N,
    "chunk_size_small": CHUNK_SIZE_SMALL_HEAD,
    "chunk_size_large": CHUNK_SIZE,
    "triton_chunk_size": TRITON_CHUNK_SIZE,
}
# Working memory per group of rank-one terms in fleet.
FLEET_BUDGET_BYTES = 64 << 20
# A plan may use at most this fraction of the memory available on the device.
MEMORY_HEADROOM = 0.8
# Plans below this size are never memory-checked (querying the OS costs more than the risk).
MEMORY_CHECK_MIN_BYTES = 256 << 20


class MethodRefusedError(ValueError):
    """No method (or not the forced one) can run these inputs; the message lists every reason."""


@dataclass
class Choice:
    method: Method
    options: dict
    reason: str
    refusals: dict[str, list[str]] = field(default_factory=dict)
    estimate_bytes: int = 0


def available_memory(device: torch.device) -> int:
    """Bytes free for new allocations on `device`: the CUDA driver's count, or the OS's available memory."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def setting(name: str, x: AttentionInputs) -> tuple[int, str]:
    """A TUNABLE value for these inputs: (value, where it comes from: this machine's table, or the default)."""
    values, table = tuning.lookup(x.device, x.dtype)
    if name in values:
        return values[name], f"measured on this machine: {table}"
    return TUNABLE[name], "default"


def subnormal_band_powers(log_decay: torch.Tensor, chunk: int) -> int:
    """The most powers lambda^j, 1 <= j <= chunk, of one head that lie in [tiny, SUBNORMAL_BAND * tiny] of the
    dtype, where their products with ordinary values turn subnormal. Reads the decay on the host."""
    tiny = torch.finfo(log_decay.dtype).tiny
    low, high = -math.log(SUBNORMAL_BAND * tiny), -math.log(tiny)  # the band of -j log lambda
    most = 0
    for rate in (-g for g in log_decay.tolist()):
        if rate > 0:
            first, last = max(1, math.ceil(low / rate)), min(chunk, math.floor(high / rate))
            most = max(most, last - first + 1)
    return most


def chunk_size_for(x: AttentionInputs, chunk: int) -> int:
    """`chunk`, halved on CPU while the decays put many factors of a chunk just above the smallest normal number."""
    if x.device.type != "cpu" or tracing():
        return chunk
    while chunk > SUBNORMAL_MIN_CHUNK and subnormal_band_powers(x.log_decay, chunk) > SUBNORMAL_MAX_POWERS:
        chunk //= 2
    return chunk


def options_for(method: Method, x: AttentionInputs) -> dict:
    if method.name == "chunked":
        small = max(x.dk, x.dv) <= SMALL_HEAD_DIM
        chunk = chunk_size_for(x, setting("chunk_size_small" if small else "chunk_size_large", x)[0])
        return {"chunk_size": chunk, "segment_bytes": SEGMENT_BYTES}
    if method.name == "fleet":
        return {"budget_bytes": FLEET_BUDGET_BYTES}
    if method.name == "triton_chunked":
        return {"chunk_size": setting("triton_chunk_size", x)[0], "precision": TRITON_PRECISION}
    return {}


def estimate_bytes(method: Method, x: AttentionInputs, options: dict) -> int:
    """Planned peak allocation: the method's working memory, the output and the final state."""
    out = x.batch * x.heads * x.seq_len * x.dv * x.q.element_size()
    state = x.batch * x.heads * x.dk * x.dv * torch.finfo(x.compute_dtype).bits // 8
    return int(method.extra_memory_bytes(x, **options)) + out + state


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


def priority(x: AttentionInputs) -> tuple[list[str], str]:
    """Methods in the order "auto" tries them, and why that order."""
    order, why = _torch_priority(x)
    if x.device.type == "cuda":
        return (
            TRITON_FIRST_ON_CUDA + order,
            "on CUDA the Triton kernels come first: one fused launch per call with the state kept on chip, where "
            "the torch methods launch several kernels per chunk from Python; without them: " + why,
        )
    return order + TRITON_FIRST_ON_CUDA, why  # off CUDA (Triton's interpreter) the kernels are for testing only


def _torch_priority(x: AttentionInputs) -> tuple[list[str], str]:
    limit, source = setting("vanilla_max_n", x)
    source = "" if source == "default" else f" ({source})"
    if x.seq_len <= limit:
        return (
            ["vanilla", "chunked", "recursion", "fleet", "recurrent"],
            f"N={x.seq_len} <= {limit}{source}: the quadratic form is one matmul and fastest at this length",
        )
    return (
        ["chunked", "recursion", "fleet", "recurrent", "vanilla"],
        f"N={x.seq_len} > {limit}{source}: chunked does O(N) work in large batched matmuls",
    )


def reasons_for(
    method: Method, x: AttentionInputs, options: dict, memory: dict, check_from: int | None = None
) -> tuple[list[str], int]:
    """The method's own refusals plus the memory guard, and its planned bytes. The guard runs for plans of
    `check_from` bytes or more (MEMORY_CHECK_MIN_BYTES by default; the benchmark checks every size).
    `memory` caches the device's free memory across the methods of one decision."""
    reasons = list(method.not_supported_reasons(x))
    need = estimate_bytes(method, x, options)
    if need >= (MEMORY_CHECK_MIN_BYTES if check_from is None else check_from):
        if "free" not in memory:
            memory["free"] = available_memory(x.device)
        limit = MEMORY_HEADROOM * memory["free"]
        if need > limit:
            reasons.append(
                f"needs about {format_bytes(need)} but {format_bytes(memory['free'])} is available on "
                f"{x.device.type} (limit {MEMORY_HEADROOM:.0%} of it)"
            )
    return reasons, need


def known_methods() -> str:
    return ", ".join(["auto", *REGISTRY])


def resolve_name(method) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of {known_methods()}; got {type(method).__name__}.")
    if method == "auto":
        forced = os.environ.get(ENV_METHOD, "").strip()
        if forced and forced != "auto":
            if forced not in REGISTRY:
                raise ValueError(f"{ENV_METHOD}={forced!r} is not a method; known: {known_methods()}.")
            return forced
        return "auto"
    if method not in REGISTRY:
        raise ValueError(f"unknown method {method!r}; known: {known_methods()}.")
    return method


def forced_by(method: str, name: str) -> str:
    """How a method named `name` was forced when the call said `method`."""
    if method == "auto":
        return f"forced by the environment variable {ENV_METHOD}={name} (the call said method='auto')"
    return f"forced by method={name!r}"


def representative(x: AttentionInputs) -> AttentionInputs:
    """The largest single call a packed or checkpointed problem makes: what the method must handle."""
    if x.cu_seqlens is None:
        return x
    first = None if x.initial_state is None else x.initial_state[:1]
    return x.piece(0, x.longest, first, x.output_final_state)


def choose(x: AttentionInputs, method: str = "auto") -> Choice:
    described = x.describe()  # the caller's inputs; the checks see the largest single call they make
    x = representative(x)
    name = resolve_name(method)
    memory: dict = {}
    if name != "auto":
        m = REGISTRY[name]
        opts = options_for(m, x)
        reasons, need = reasons_for(m, x, opts, memory)
        if reasons:
            hint = (
                f"unset {ENV_METHOD} (or set it to 'auto') so that auto picks a method that can"
                if method == "auto"
                else "method='auto' picks one that can"
            )
            raise MethodRefusedError(
                f"method {name!r} cannot run {described}: " + "; ".join(reasons)
                + f". It is {forced_by(method, name)}. Hint: {hint} (see leetdecoding.explain)."
            )
        return Choice(m, opts, forced_by(method, name), {}, need)
    order, why = priority(x)
    refusals: dict[str, list[str]] = {}
    for n in order:
        m = REGISTRY[n]
        opts = options_for(m, x)
        reasons, need = reasons_for(m, x, opts, memory)
        if not reasons:
            return Choice(m, opts, why, refusals, need)
        refusals[n] = reasons
    for n, m in REGISTRY.items():  # the error names every method, also those "auto" does not try here
        if n not in refusals:
            refusals[n] = reasons_for(m, x, options_for(m, x), memory)[0] or [
                f"not tried by auto on {x.device.type} (pass method={n!r} to use it)"
            ]
    listing = "\n".join(f"  {n}: {'; '.join(r)}" for n, r in refusals.items())
    raise MethodRefusedError(f"no method can run {described}:\n{listing}")


@dataclass
class Explanation:
    """What "auto" (or a forced method) does with these inputs, and why each other method is not used."""

    inputs: str
    method: str | None
    options: dict
    reason: str
    refusals: dict[str, list[str]]
    others: list[str]  # methods that could run these inputs but are not used
    estimate_bytes: int
    forced: bool = False  # the method was forced (method= or the environment): `others` are never chosen

    def __repr__(self) -> str:
        lines = [f"inputs: {self.inputs}"]
        if self.method is None:
            what = "the forced method cannot run these inputs" if self.forced else "no method can run these inputs"
            lines.append(f"{what}: {self.reason}")
        else:
            opts = ", ".join(f"{k}={v}" for k, v in self.options.items())
            lines.append(f"chosen: {self.method}" + (f" ({opts})" if opts else ""))
            lines.append(f"  why: {self.reason}")
            lines.append(f"  planned memory: {format_bytes(self.estimate_bytes)}")
        for n, r in self.refusals.items():
            lines.append(f"refused: {n}: {'; '.join(r)}")
        if self.forced and self.others:  # never chosen while the method is forced, whatever their priority
            forced = f"{self.method} is {self.reason}" if self.method else "another method is forced"
            lines.append(f"not used ({forced}): {', '.join(self.others)} could also run these")
        else:
            lines.extend(f"also possible (lower priority): {n}" for n in self.others)
        return "\n".join(lines)

    __str__ = __repr__


def explain(x: AttentionInputs, method: str = "auto") -> Explanation:
    described = x.describe()
    memory: dict = {}
    forced = resolve_name(method) != "auto"
    try:
        c = choose(x, method)  # the caller's inputs: a refusal describes them, not the largest piece
    except MethodRefusedError as e:
        chosen, options, reason, estimate = None, {}, str(e), 0
    else:
        chosen, options, reason, estimate = c.method.name, c.options, c.reason, c.estimate_bytes
    x = representative(x)
    refusals, others = {}, []
    for n, m in REGISTRY.items():
        r = reasons_for(m, x, options_for(m, x), memory)[0]
        if r:
            refusals[n] = r
        elif n != chosen:
            others.append(n)
    return Explanation(described, chosen, options, reason, refusals, others, estimate, forced)
