"""No call uses a decay other than the one it was given, whatever remembered its tables before.

Every write path is covered: in place (`copy_`), through `.data`, through a numpy view, through the numpy array a
`torch.from_numpy` tensor shares; under torch.compile (aot_eager) and eagerly; from other threads. Each call is
compared with the fp64 reference for the decay the tensor holds at that call.
"""

from __future__ import annotations

import copy
import functools
import sys
import threading

import numpy as np
import pytest
import torch

import leetdecoding as ld
import leetdecoding.layers as ld_layers
from leetdecoding.methods.naive import reference
from leetdecoding.nn import DecayingLinearAttention, LinearAttentionCache

from .reference import assert_close

OLD = [0.9, 1.0]
NEW = [0.3, 0.8]
SCALE = 0.5
# N per method: chunked and auto (which picks chunked there) over several chunks and a partial one; the
# per-token methods shorter, so that compiling them stays quick
LENGTHS = {"vanilla": 70, "chunked": 200, "recurrent": 70, "auto": 200}
COMPILED_LENGTHS = {"vanilla": 10, "chunked": 70, "recurrent": 10, "auto": 10}  # tracing time grows with N


@functools.cache  # the same tensors each time (tests only read them), so that a test can tell them apart
def qkv(n: int, h: int = 2, d: int = 16):
    g = torch.Generator().manual_seed(n)
    return tuple(torch.randn(1, h, n, d, generator=g) for _ in range(3))


def decay_tensor(how: str, values):
    """A decay tensor and a function that writes new values into it by `how`."""
    if how == "from_numpy":
        arr = np.array(values, dtype=np.float32)

        def write(new):
            arr[:] = new

        return torch.from_numpy(arr), write
    lam = torch.tensor(values)
    writers = {
        "copy_": lambda new: lam.copy_(torch.tensor(new)),
        "data": lambda new: lam.data.copy_(torch.tensor(new)),
        "numpy": lambda new: lam.numpy().__setitem__(slice(None), new),
    }
    return lam, writers[how]


# writes that do not bump the version counter (in place writes are covered under torch.compile below)
WRITES = ["data", "numpy", "from_numpy"]


def held(values, kind="decay") -> torch.Tensor:
    """lambda in fp64 exactly as an fp32 tensor of `values` (lambda, or log lambda for "log_decay") holds it."""
    t = torch.tensor(values, dtype=torch.float32).double()
    return t if kind == "decay" else torch.exp(t)


def check_attention(o, state, q, k, v, values, what, kind="decay"):
    r = reference(q, k, v, held(values, kind), scale=SCALE)
    assert_close(f"{what}: o", o, r.o, r.o_abs, torch.float32)
    assert_close(f"{what}: state", state, r.state, r.state_abs, torch.float32)


def call(method, kind, q, k, v, lam):
    """attention with lam as `decay`, or log(lam) as `log_decay` (a new tensor, so written through lam only)."""
    if kind == "decay":
        return ld.attention(q, k, v, decay=lam, method=method, scale=SCALE, output_final_state=True)
    return ld.attention(q, k, v, log_decay=lam, method=method, scale=SCALE, output_final_state=True)


def log_values(values):
    return torch.log(torch.tensor(values, dtype=torch.float64)).float().tolist()


@pytest.mark.parametrize("kind", ["decay", "log_decay"])
@pytest.mark.parametrize("how", WRITES)
@pytest.mark.parametrize("method", list(LENGTHS))
def test_eager_calls_see_every_write(method, how, kind):
    q, k, v = qkv(LENGTHS[method])
    old, new = (OLD, NEW) if kind == "decay" else (log_values(OLD), log_values(NEW))
    lam, write = decay_tensor(how, old)
    check_attention(*call(method, kind, q, k, v, lam), q, k, v, old, "before the write", kind)
    write(new)
    for i in range(2):  # the first call after the write, and one that could reuse what it derived
        check_attention(*call(method, kind, q, k, v, lam), q, k, v, new, f"call {i} after {how}", kind)


def check_decode(q, k, v, state, values, o, new_state, what):
    r = reference(q[:, :, None], k[:, :, None], v[:, :, None], held(values), state)
    assert_close(f"{what}: o", o[:, :, None], r.o, r.o_abs, torch.float32)
    assert_close(f"{what}: state", new_state, r.state, r.state_abs, torch.float32)


@functools.cache
def decode_inputs():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, 16, generator=g) for _ in range(3))
    return q, k, v, torch.randn(3, 2, 16, 16, generator=g)


@pytest.mark.parametrize("how", WRITES)
def test_decode_step_sees_every_write(how):
    q, k, v, state = decode_inputs()
    lam, write = decay_tensor(how, OLD)
    check_decode(q, k, v, state, OLD, *ld.decode_step(q, k, v, state, lam), "before the write")
    write(NEW)
    for i in range(2):
        check_decode(q, k, v, state, NEW, *ld.decode_step(q, k, v, state, lam), f"call {i} after {how}")


@pytest.mark.parametrize("method", list(COMPILED_LENGTHS))
def test_compiled_calls_see_every_write(method):
    """The issue's case: a compiled call kept the tables of the decay it was first traced with."""
    q, k, v = qkv(COMPILED_LENGTHS[method])
    lam = torch.tensor(OLD)
    f = torch.compile(lambda q, k, v, lam: call(method, "decay", q, k, v, lam), backend="aot_eager", dynamic=False)
    check_attention(*f(q, k, v, lam), q, k, v, OLD, "compiled, before the write")
    values = [NEW, [0.5, 0.7], [0.95, 0.6]]
    for (how, write), new in zip([("copy_", lam.copy_), ("data", lam.data.copy_), ("numpy", None)], values):
        if write is None:
            lam.numpy()[:] = new
        else:
            write(torch.tensor(new))
        check_attention(*f(q, k, v, lam), q, k, v, new, f"compiled, after {how}")


def test_compiled_decode_step_sees_writes():
    q, k, v, state = decode_inputs()
    lam = torch.tensor(OLD)
    f = torch.compile(lambda q, k, v, s, lam: ld.decode_step(q, k, v, s, lam), backend="aot_eager", dynamic=False)
    check_decode(q, k, v, state, OLD, *f(q, k, v, state, lam), "compiled, before the write")
    lam.copy_(torch.tensor(NEW))
    check_decode(q, k, v, state, NEW, *f(q, k, v, state, lam), "compiled, after copy_")
    lam.data.copy_(torch.tensor(OLD))
    check_decode(q, k, v, state, OLD, *f(q, k, v, state, lam), "compiled, after .data")


# ----- the layer -----


def make_layer():
    torch.manual_seed(0)
    return DecayingLinearAttention(hidden_size=32, num_heads=2, head_dim=16, log_decay=torch.log(torch.tensor(OLD)))


def layer_reference(layer, x, monkeypatch):
    """The layer's output in fp64 with its attention replaced by the fp64 reference, for its decay now."""
    m = copy.deepcopy(layer).double()

    def reference_attention(q, k, v, log_decay, scale, **unused):
        return reference(q, k, v, torch.exp(log_decay.double()), scale=scale).o.to(q.dtype)

    with monkeypatch.context() as patch:
        patch.setattr(ld_layers, "attention", reference_attention)  # the layer's one call
        with torch.no_grad():
            return m(x.double())


def assert_layer_close(what, got, ref):
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 1e-5, f"{what}: relative error {err:.3g} against the fp64 reference for the decay it holds"


def write_layer_decay(layer, how, values):
    log = torch.log(torch.tensor(values))
    if how == "load_state_dict":
        layer.load_state_dict({**layer.state_dict(), "log_decay": log})
    elif how == "data":
        layer.log_decay.data.copy_(log)
    else:
        layer.log_decay.numpy()[:] = log.numpy()


@pytest.mark.parametrize("how", ["data", "numpy"])
def test_layer_sees_every_write(how, monkeypatch):
    """Prefill and decode with a cache, after the layer's decay buffer was written (eagerly)."""
    layer = make_layer()
    x = torch.randn(2, 70, 32)
    with torch.no_grad():
        layer(x)  # derives what it can from the old decay
        write_layer_decay(layer, how, NEW)
        assert_layer_close(f"forward after {how}", layer(x), layer_reference(layer, x, monkeypatch))
        cache = LinearAttentionCache()
        parts = [layer(x[:, :68], cache=cache)] + [layer(x[:, t : t + 1], cache=cache) for t in (68, 69)]
    assert_layer_close(f"prefill + decode after {how}", torch.cat(parts, 1), layer_reference(layer, x, monkeypatch))


def test_compiled_layer_sees_load_state_dict(monkeypatch):
    layer = make_layer()
    compiled = torch.compile(layer, backend="aot_eager", dynamic=False)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        assert_layer_close("compiled, before", compiled(x), layer_reference(layer, x, monkeypatch))
        for how, values in (("load_state_dict", NEW), ("data", [0.5, 0.7])):
            write_layer_decay(layer, how, values)
            assert_layer_close(f"compiled, after {how}", compiled(x), layer_reference(layer, x, monkeypatch))


# ----- threads -----


@pytest.fixture
def frequent_switches():
    """Threads switch every few microseconds instead of every 5 ms, so that races show within a short test."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def run_threads(targets):
    errors = []

    def guarded(target):
        try:
            target()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} thread(s) failed, first: {errors[0]!r}"


def test_concurrent_calls_with_many_decays(frequent_switches):
    """Four threads at once over a few more decay tensors than a memo keeps (hits and evictions interleave):
    no error, every output that of its own decay."""
    q, k, v = qkv(70)
    pool = [[0.5 + 0.02 * i, 1.0 - 0.01 * i] for i in range(18)]
    tensors = [torch.tensor(p) for p in pool]
    refs = [reference(q, k, v, held(p), scale=SCALE) for p in pool]

    def worker(seed):
        order = torch.randint(len(pool), (30,), generator=torch.Generator().manual_seed(seed)).tolist()
        for j in order:
            o = ld.attention(q, k, v, decay=tensors[j], method="chunked", scale=SCALE)
            assert_close(f"decay {pool[j]}", o, refs[j].o, refs[j].o_abs, torch.float32)

    for round in range(3):
        run_threads([lambda s=s: worker(s) for s in range(4 * round, 4 * round + 4)])


def decode_or_attend(method, lam):
    """(o, state) of decode_step, or of attention with `method`, on fixed inputs with decay `lam`."""
    if method == "decode_step":
        q, k, v, state = decode_inputs()
        o, state = ld.decode_step(q, k, v, state, lam)
        return o[:, :, None], state
    q, k, v = qkv(70)
    return ld.attention(q, k, v, decay=lam, method=method, output_final_state=True)


def decode_or_attend_reference(method, values):
    if method == "decode_step":
        q, k, v, state = decode_inputs()
        return reference(q[:, :, None], k[:, :, None], v[:, :, None], held(values), state)
    return reference(*qkv(70), held(values))


@pytest.mark.parametrize("method", ["decode_step", "chunked"])
def test_writer_thread_never_leaves_stale_tables(method, frequent_switches):
    """One thread writes the decay, alternating two values, while another calls with it: each call uses, per
    head, one of the two values; once the writer is done, every call uses the value it wrote last."""
    values = (OLD, NEW)
    refs = [decode_or_attend_reference(method, p) for p in values]

    def one_of_the_values(o, what):
        for h in range(o.shape[1]):
            bound = [1e-5 * r.o_abs[:, h].max().item() for r in refs]
            ok = [torch.allclose(o[:, h].double(), r.o[:, h], rtol=0, atol=b) for r, b in zip(refs, bound)]
            assert any(ok), f"{what}, head {h}: the output is that of neither value"

    for round in range(6):
        lam = torch.tensor(OLD)
        done = threading.Event()

        def writer(lam=lam, done=done):
            for i in range(1, 201):  # ends with values[0]: OLD
                lam.copy_(torch.tensor(values[i % 2]))
            done.set()

        def caller(lam=lam, done=done, round=round):
            while not done.is_set():
                one_of_the_values(decode_or_attend(method, lam)[0], f"round {round}, while writing")

        run_threads([writer, caller])
        for i in range(2):
            o, state = decode_or_attend(method, lam)
            r = refs[0]
            assert_close(f"round {round}, call {i} after the writer: o", o, r.o, r.o_abs, torch.float32)
            assert_close(f"round {round}, call {i} after the writer: state", state, r.state, r.state_abs, torch.float32)


class WriteDuringCall(torch.overrides.TorchFunctionMode):
    """Writes `values` into `lam` in place at the first torch call the library makes with a tensor that is not
    one of `inputs`: what a thread that writes the decay while another thread is inside a call does, at a chosen
    moment (after the call has started, before it has finished deriving from the decay)."""

    def __init__(self, lam, values, inputs):
        super().__init__()
        self.lam, self.values, self.inputs, self.written = lam, values, {id(t) for t in inputs}, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if not self.written and tensors and all(id(t) not in self.inputs for t in tensors):
            self.written = True
            self.lam.copy_(torch.tensor(self.values))  # the mode is off inside its own handler
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["decode_step", "vanilla", "chunked", "recurrent"])
def test_a_write_during_a_call_is_seen_by_the_next_calls(method):
    """The deterministic form of the race: the decay changes while a call derives from it. That call may use
    either value; every later call uses the new one (the original memo stored the old tables under the new
    version, and used them call after call)."""
    lam = torch.tensor([0.6, 0.95])  # values no other test uses, so nothing derived from them is remembered yet
    inputs = [lam, *decode_inputs(), *qkv(70)]
    with WriteDuringCall(lam, NEW, inputs) as mode:
        decode_or_attend(method, lam)
    assert mode.written
    r = decode_or_attend_reference(method, NEW)
    for i in range(2):
        o, state = decode_or_attend(method, lam)
        assert_close(f"call {i} after the write: o", o, r.o, r.o_abs, torch.float32)
        assert_close(f"call {i} after the write: state", state, r.state, r.state_abs, torch.float32)
