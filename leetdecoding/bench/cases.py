"""What `leetdecoding bench` runs at one (N, batch), per mode: the inputs, the timed call, and its check.

    forward   the method's forward on N tokens (Method.forward with the dispatcher's options)
    backward  forward + backward through ld.attention(method=...): o and the gradients of q, k, v for a fixed do
    decode    one ld.decode_step of a decode method after a prefill of N tokens, the state updated in place
              (out_state=state), as a server runs it

Every case answers `reasons(method)` (why it is not run), `call(method)` (the callable that is timed; its first
call's result is checked) and `error(method, first_result)`: the worst `relative_error` against the fp64 answer
(bench.fp64), for the output and, in backward, every gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import api, dispatch
from .. import decay as _decay
from ..choice import MethodRefusedError
from ..inputs import AttentionInputs, validate
from ..methods import REGISTRY, Method
from ..methods.decode import DECODE_REGISTRY
from ..methods.naive import relative_error
from .fp64 import fp64_gradients, fp64_sums

MODES = ("forward", "backward", "decode")
DECODE_CHECK_TOKENS = 8  # decode steps checked against fp64, from the prefilled state, before the timing


@dataclass
class SweepConfig:
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    methods: list[str] | None = None  # None: every method of the mode (attention methods; decode methods)
    lengths: list[int] = field(default_factory=lambda: [256, 1024, 4096, 16384])  # decode: the prefill length
    batches: list[int] = field(default_factory=lambda: [1])
    heads: int = 8
    dk: int = 128
    dv: int = 128
    repeats: int = 5  # timed samples per case (per round: a noisy case is measured again, see timing.measure)
    warmup: int = 1
    time_budget: float = 10.0  # seconds per case, warm-up, repeats and re-measurements together
    log_decay: torch.Tensor | None = None  # (H,) log lambda; None: MiniMax layer 0 of 12, as the CLI
    seed: int = 0
    mode: str = "forward"  # one of MODES
    max_rounds: int = 3  # measurements of a noisy case, the first included
    per_token: bool = False  # a decay per token (leetdecoding.gates): each head's, times a seeded factor per token

    def resolved_log_decay(self) -> torch.Tensor:
        if self.log_decay is not None:
            return self.log_decay
        return _decay.minimax(self.heads, 0, 12)

    def registry(self) -> dict:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {self.mode!r}.")
        return DECODE_REGISTRY if self.mode == "decode" else REGISTRY

    def method_names(self) -> list[str]:
        registry = self.registry()
        names = list(registry) if self.methods is None else list(self.methods)
        unknown = [m for m in names if m not in registry]
        if unknown:
            raise ValueError(f"unknown {self.mode} methods {unknown}; known: {', '.join(registry)}.")
        return names

    @property
    def calls_per_case(self) -> int:
        """Calls one case makes: the warm-up (the first one measures memory) and the timed repeats."""
        return max(self.warmup, 1) + self.repeats


def make_inputs(cfg: SweepConfig, n: int, batch: int, grad: bool = False) -> AttentionInputs:
    """Seeded random q, k, v of the configured shape, dtype and device, validated like a public call; leaves that
    require grad with `grad`."""
    g = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 7919 * n + batch)
    gen_dtype = torch.float64 if cfg.dtype == torch.float64 else torch.float32

    def randn(d: int) -> torch.Tensor:
        t = torch.randn(batch, cfg.heads, n, d, generator=g, device=cfg.device, dtype=gen_dtype)
        return t.to(cfg.dtype).requires_grad_(grad)

    q, k, v = randn(cfg.dk), randn(cfg.dk), randn(cfg.dv)
    log_decay = cfg.resolved_log_decay()
    if cfg.per_token:  # log(lambda_h * u), u uniform in [0.5, 1]
        u = torch.rand(batch, cfg.heads, n, generator=g, device=cfg.device, dtype=torch.float64)
        log_decay = (log_decay.to(cfg.device, torch.float64).view(1, -1, 1) + torch.log(0.5 + 0.5 * u)).float()
    return validate(q, k, v, None, log_decay)


def auto_pick(x: AttentionInputs) -> str:
    try:
        return dispatch.choose(x).method.name
    except MethodRefusedError:
        return "none"


def skip_reasons(method: Method, x: AttentionInputs, options: dict) -> list[str]:
    """The dispatcher's refusals for this method, its memory guard applied at every size."""
    return dispatch.reasons_for(method, x, options, {}, check_from=0)[0]


class ForwardCase:
    """One (N, batch) of the forward mode: shared inputs, the "auto" pick, the fp64 answer on first use."""

    registry = REGISTRY

    def __init__(self, cfg: SweepConfig, n: int, batch: int):
        self.x = make_inputs(cfg, n, batch)
        self.auto = auto_pick(self.x)
        self._o64: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def o64(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._o64 is None:
            x = self.x
            self._o64 = fp64_sums(x.q.detach(), x.k.detach(), x.v.detach(), x.log_decay, x.scale)
        return self._o64

    def reasons(self, method: Method) -> list[str]:
        return skip_reasons(method, self.x, dispatch.options_for(method, self.x))

    def call(self, method: Method):
        x, options = self.x, dispatch.options_for(method, self.x)
        return lambda: method.forward(x, **options)

    def error(self, method: Method, result) -> float:
        return relative_error(result[0], *self.o64)


class BackwardCase(ForwardCase):
    """Forward + backward: the timed call returns (o, dq, dk, dv) for a fixed, seeded output gradient `do`."""

    def __init__(self, cfg: SweepConfig, n: int, batch: int):
        self.x = make_inputs(cfg, n, batch, grad=True)
        g = torch.Generator(device=cfg.device).manual_seed(cfg.seed + 104729 * n + batch)
        shape = (batch, cfg.heads, n, cfg.dv)
        self.do = torch.randn(shape, generator=g, device=cfg.device).to(cfg.dtype)
        self.auto = auto_pick(self.x)
        self._o64 = None
        self._references: list | None = None

    def references(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(fp64 value, magnitude) of o, dq, dk, dv."""
        if self._references is None:
            x = self.x
            self._references = [self.o64, *fp64_gradients(x.q, x.k, x.v, x.log_decay, x.scale, self.do)]
        return self._references

    def call(self, method: Method):
        x, do = self.x, self.do

        def forward_backward():
            o = api.attention(x.q, x.k, x.v, log_decay=x.log_decay, scale=x.scale, method=method.name)
            return (o, *torch.autograd.grad(o, (x.q, x.k, x.v), do))

        return forward_backward

    def error(self, method: Method, result) -> float:
        return max(relative_error(t, *ref) for t, ref in zip(result, self.references(), strict=True))


class DecodeCase:
    """Decode after a prefill of N tokens (ld.attention with "auto", final state kept). The timed call is one
    `ld.decode_step` with out_state=state; the check runs DECODE_CHECK_TOKENS steps from the prefilled state and
    compares their outputs with the fp64 answer for the whole N + DECODE_CHECK_TOKENS tokens."""

    registry = DECODE_REGISTRY

    def __init__(self, cfg: SweepConfig, n: int, batch: int):
        x = self.x = make_inputs(cfg, n + DECODE_CHECK_TOKENS, batch)
        self.n = n
        prefix = (t[:, :, :n] for t in (x.q, x.k, x.v))
        self.prefilled = api.attention(*prefix, log_decay=x.log_decay, scale=x.scale, output_final_state=True)[1]
        self.state = self.prefilled.clone()  # the buffer every step updates in place
        self.tokens = [tuple(t[:, :, i].contiguous() for t in (x.q, x.k, x.v)) for i in range(n, x.seq_len)]
        self.auto = self._explain("auto").method or "none"
        self._o64: tuple[torch.Tensor, torch.Tensor] | None = None

    def _explain(self, method: str):
        return api.explain_decode(*self.tokens[0], self.state, log_decay=self.x.log_decay, scale=self.x.scale,
                                  method=method)  # fmt: skip

    def _step(self, method, token):
        q, k, v = token
        return api.decode_step(q, k, v, self.state, log_decay=self.x.log_decay, scale=self.x.scale,
                               out_state=self.state, method=method.name)  # fmt: skip

    def reasons(self, method) -> list[str]:
        return self._explain(method.name).refusals.get(method.name, [])

    def call(self, method):
        self.state.copy_(self.prefilled)  # each method starts from the prefill
        first = self.tokens[0]
        return lambda: self._step(method, first)

    def error(self, method, result) -> float:
        """The first call's output and those of the next check tokens, each from the state the previous step
        wrote in place, against fp64 rows N, N+1, ..."""
        outputs = [result[0]] + [self._step(method, token)[0] for token in self.tokens[1:]]
        if self._o64 is None:
            self._o64 = fp64_sums(self.x.q, self.x.k, self.x.v, self.x.log_decay, self.x.scale)
        o64, o_abs = (t[:, :, self.n :] for t in self._o64)
        return relative_error(torch.stack(outputs, dim=2), o64, o_abs)


CASES = {"forward": ForwardCase, "backward": BackwardCase, "decode": DecodeCase}
