"""The one place that chooses a method.

Each method answers `not_supported_reasons(inputs)`; this module adds the memory check, walks a priority list
and returns the first method with no reasons, or raises one error naming every method and its reasons.
A forced method goes through the same check. Performance heuristics live here only, as named constants.
"""

from __future__ import annotations

import math
import os

import torch

from . import tuning
from .choice import Choice, MethodRefusedError, made, refuse_all, walk
from .explanation import Explanation, build, format_bytes
from .inputs import AttentionInputs, DecodeInputs, dtype_name
from .memo import tracing
from .methods import REGISTRY, Method
from .methods.decode import DECODE_REGISTRY

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
# With gradients, chunked's forward keeps one state per span of chunks, and its backward recomputes the
# chunk-start states of one span into a buffer of this size (16 chunks of 64 at B=1, H=8, D=128 fp32):
# larger keeps fewer states and recomputes into a larger buffer. Without gradients it changes nothing.
SPAN_BYTES = 8 << 20
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
# Decode: on CUDA one fused kernel per token, where the torch step launches several small kernels; elsewhere the
# torch step (the Triton kernel runs on CPU only in Triton's interpreter, for testing).
DECODE_FIRST_ON_CUDA = ["triton_step", "recurrent_step"]
# Working memory per group of rank-one terms in fleet.
FLEET_BUDGET_BYTES = 64 << 20
# A plan may use at most this fraction of the memory available on the device.
MEMORY_HEADROOM = 0.8
# Plans below this size are never memory-checked (querying the OS costs more than the risk).
MEMORY_CHECK_MIN_BYTES = 256 << 20


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
    if x.device.type != "cpu" or tracing() or x.per_token:
        return chunk
    while chunk > SUBNORMAL_MIN_CHUNK and subnormal_band_powers(x.log_decay, chunk) > SUBNORMAL_MAX_POWERS:
        chunk //= 2
    return chunk


def options_for(method: Method, x: AttentionInputs) -> dict:
    """The value of each option `method` declares (`Method.options`), for these inputs."""
    if method.name == "chunked":
        small = max(x.dk, x.dv) <= SMALL_HEAD_DIM
        chunk = chunk_size_for(x, setting("chunk_size_small" if small else "chunk_size_large", x)[0])
        return {"chunk_size": chunk, "span_bytes": SPAN_BYTES}
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


def known_methods(registry: dict = REGISTRY) -> str:
    return ", ".join(["auto", *registry])


def resolve(method, registry: dict = REGISTRY, environment: bool = True) -> tuple[str, tuple[str, ...]]:
    """("auto", ()) for auto; ("auto", names) for a sequence of names (auto among these); (name, ()) for one
    method. With `environment`, auto is forced to ENV_METHOD's method when that variable names one."""
    if isinstance(method, (list, tuple)) and method and all(isinstance(n, str) for n in method):
        unknown = [n for n in method if n not in registry]
        if unknown:
            known = known_methods(registry)
            raise ValueError(f"unknown method {unknown[0]!r} in method={list(method)}; known: {known}.")
        return ("auto", tuple(method)) if len(method) > 1 else (method[0], ())
    if not isinstance(method, str):
        raise TypeError(
            f"method must be a string, one of {known_methods(registry)} (or a non-empty list of method names); "
            f"got {type(method).__name__}."
        )
    if method == "auto":
        forced = os.environ.get(ENV_METHOD, "").strip() if environment else ""
        if forced and forced != "auto":
            if forced not in registry:
                raise ValueError(f"{ENV_METHOD}={forced!r} is not a method; known: {known_methods(registry)}.")
            return forced, ()
        return "auto", ()
    if method not in registry:
        raise ValueError(f"unknown method {method!r}; known: {known_methods(registry)}.")
    return method, ()


def resolve_name(method) -> str:
    return resolve(method)[0]


def forced_by(method, name: str) -> str:
    """How a method named `name` was forced when the call said `method`."""
    if method == "auto":
        return f"forced by the environment variable {ENV_METHOD}={name} (the call said method='auto')"
    return f"forced by method={name!r}"


def representative(x: AttentionInputs) -> AttentionInputs:
    """The largest single call a packed or checkpointed problem makes: what the method must handle."""
    if x.offsets is None:
        return x
    first = None if x.initial_state is None else x.initial_state[:1]
    return x.segment(0, x.longest, first, x.output_final_state)


def _refuse_forced(method, name: str, described: str, reasons: list[str]) -> MethodRefusedError:
    hint = (
        f"unset {ENV_METHOD} (or set it to 'auto') so that auto picks a method that can"
        if method == "auto"
        else "method='auto' picks one that can"
    )
    return MethodRefusedError(
        f"method {name!r} cannot run {described}: " + "; ".join(reasons)
        + f". It is {forced_by(method, name)}. Hint: {hint} (see leetdecoding.explain)."
    )


def choose(x: AttentionInputs, method="auto") -> Choice:
    """The method for these inputs: `method` is "auto", a method name, or a sequence of names (auto among
    these). Raises MethodRefusedError naming every method tried and its reasons."""
    return made(_choose(x, method))


def _choose(x: AttentionInputs, method) -> Choice:
    described = x.describe()  # the caller's inputs; the checks see the largest single call they make
    x = representative(x)
    name, among = resolve(method)
    memory: dict = {}
    plans = {}

    def reasons(n: str) -> list[str]:
        m = REGISTRY[n]
        opts = options_for(m, x)
        r, need = reasons_for(m, x, opts, memory)
        plans[n] = (opts, need)
        return r

    if name != "auto":
        r = reasons(name)
        if r:
            raise _refuse_forced(method, name, described, r)
        opts, need = plans[name]
        return Choice(REGISTRY[name], opts, forced_by(method, name), {}, need)
    order, why = priority(x)
    name, why, refusals = walk(order, among, why, reasons)
    if name:
        opts, need = plans[name]
        return Choice(REGISTRY[name], opts, why, refusals, need)
    for n in among or REGISTRY:  # the error names every method, also those "auto" does not try here
        if n not in refusals:
            refusals[n] = reasons(n) or [f"not tried by auto on {x.device.type} (pass method={n!r} to use it)"]
    raise refuse_all(described, refusals, among)


def decode_priority(d: DecodeInputs) -> tuple[list[str], str]:
    """Decode methods in the order "auto" tries them, and why that order."""
    if d.q.device.type == "cuda":
        return DECODE_FIRST_ON_CUDA, "on CUDA the fused Triton kernel: one launch per token, the state read once"
    return DECODE_FIRST_ON_CUDA[::-1], f"on {d.q.device.type} the torch step (Triton's kernels are for CUDA)"


_DECODE_CHOICES: dict[tuple, Choice] = {}  # (method, DecodeInputs.key()) -> the choice: decoding asks every token
_DECODE_CHOICES_SIZE = 64


def choose_decode(d: DecodeInputs, method="auto") -> Choice:
    """The decode method for this step (`method` as in `choose`; the environment variable is for attention)."""
    key = (method if isinstance(method, str) else tuple(method), d.key())
    choice = _DECODE_CHOICES.get(key)
    if choice is None:
        choice = _choose_decode(d, method)
        if len(_DECODE_CHOICES) >= _DECODE_CHOICES_SIZE:
            _DECODE_CHOICES.pop(next(iter(_DECODE_CHOICES)))
        _DECODE_CHOICES[key] = choice
    return made(choice)


def _choose_decode(d: DecodeInputs, method) -> Choice:
    name, among = resolve(method, DECODE_REGISTRY, environment=False)
    described = describe_decode(d)

    def reasons(n: str) -> list[str]:
        return DECODE_REGISTRY[n].not_supported_reasons(d)

    if name != "auto":
        r = reasons(name)
        if r:
            raise _refuse_forced(method, name, described, r)
        return Choice(DECODE_REGISTRY[name], {}, forced_by(method, name), operation="decode_step")
    order, why = decode_priority(d)
    name, why, refusals = walk(order, among, why, reasons)
    if not name:
        raise refuse_all(described, refusals, among)
    return Choice(DECODE_REGISTRY[name], {}, why, refusals, operation="decode_step")


def describe_decode(d: DecodeInputs) -> str:
    (b, h, dk), dv = d.q.shape, d.v.shape[-1]
    return f"a decode step B={b}, H={h}, Dk={dk}, Dv={dv}, {dtype_name(d.q.dtype)} on {d.q.device}"


def explain(x: AttentionInputs, method="auto") -> Explanation:
    """What `choose` decides for these inputs, and every method's refusals (of the largest single call)."""
    largest, memory = representative(x), {}

    def reasons(m: Method) -> list[str]:
        return reasons_for(m, largest, options_for(m, largest), memory)[0]

    forced = resolve(method)[0] != "auto"
    return build(lambda: _choose(x, method), x.describe(), forced, REGISTRY, reasons)


def explain_decode(d: DecodeInputs, method="auto") -> Explanation:
    """What `choose_decode` decides for this step, and every decode method's refusals."""
    forced = resolve(method, DECODE_REGISTRY, environment=False)[0] != "auto"
    described, registry = describe_decode(d), DECODE_REGISTRY
    return build(lambda: _choose_decode(d, method), described, forced, registry, lambda m: m.not_supported_reasons(d))


