"""transformers' MiniMax patched by leetdecoding against unpatched: layer prefill and whole-model decode, interleaved.

    python -m benchmarks.hf_minimax            # layer: hidden 1024, 8 heads of 128, N=8192; model decode: 32 tokens

1. Prefill of one MiniMaxLightningAttention, fp32, B=1: the same module instance, unpatched and patched in turn
   before each call; once with all its projections, and once reduced to its attention core (projections,
   activation and norm replaced by identities, as in `benchmarks.common.minimax_core`). The projections alone
   (qkv, output gate, out) are timed too: both sides run them, so they bound the speed-up of the whole layer.
   Last, `--continue-n` new tokens in one call after a cached state (transformers loops over them one by one).
2. Per-token decode of a whole small random-weight MiniMax model (every fourth layer full attention, the others
   lightning attention; MoE), fp32, batch `--batch`: a prompt is prefilled (not timed), then `--steps` greedy
   tokens are generated from the cache one forward each, unpatched and patched in turn.
Both parts first check that patched and unpatched agree (outputs, then generated tokens) and refuse to report
a speed otherwise.
"""

from __future__ import annotations

import sys
import time

import torch

from benchmarks.common import arguments, feed, header, interleaved, minimax_core
from leetdecoding.bench.timing import TimingStats
from leetdecoding.integrations import hf_minimax

MAX_REL_ERR = 1e-4  # fp32 outputs of the two paths must agree this well before a speed is reported


def layer_module(hidden: int, heads: int, head_dim: int):
    from transformers import MiniMaxConfig
    from transformers.models.minimax.modeling_minimax import MiniMaxLightningAttention

    config = MiniMaxConfig(
        hidden_size=hidden, num_attention_heads=heads, head_dim=head_dim, num_hidden_layers=12,
        layer_types=["linear_attention"] * 12,
    )
    return MiniMaxLightningAttention(config, 0).eval()


def small_model(layers: int, hidden: int, heads: int, head_dim: int, vocab: int):
    """Every fourth layer full attention, the first one included; 2 experts, top 1."""
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    config = MiniMaxConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), head_dim=head_dim,
        layer_types=["full_attention" if i % 4 == 0 else "linear_attention" for i in range(layers)],
        num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=8192, eos_token_id=None,
    )
    return MiniMaxForCausalLM(config).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def refuse_if_differs(what: str, err: float) -> None:
    print(f"{what}: max relative difference of the outputs patched vs unpatched {err:.2e}")
    if not err <= MAX_REL_ERR:
        raise SystemExit(f"{what}: outputs differ by more than {MAX_REL_ERR:.0e}: no speed is reported")


def toggled(model, patch: bool, fn):
    """A call of `fn` with `model` patched or unpatched first (the same instance either way)."""
    def call():
        if patch:
            hf_minimax.patch(model)
        elif hf_minimax.report(model).patched:
            hf_minimax.unpatch(model)
        return fn()

    return call


def layer_calls(a) -> dict[str, tuple]:
    """name -> (module, call) for the layer benchmark; each call returns the module's output."""
    from transformers.models.minimax.modeling_minimax import MiniMaxCache

    torch.manual_seed(0)
    m = layer_module(a.hidden, a.heads, a.head_dim)
    x = torch.randn(1, a.n, a.hidden)
    new_tokens = torch.randn(1, a.continue_n, a.hidden)
    state = 0.1 * torch.randn(1, a.heads, a.head_dim, a.head_dim)
    core = minimax_core(a.heads, a.head_dim)
    core_in = feed(core, *(torch.randn(1, a.heads, a.n, a.head_dim) for _ in range(3)))

    def continued():
        cache = MiniMaxCache()
        cache.set_linear_cache(m.layer_idx, state.clone())
        return m(new_tokens, None, None, cache=cache)[0]

    return {
        "layer": (m, lambda: m(x, None, None)[0]),
        "continue": (m, continued),
        "core": (core, lambda: core(core_in, None, None)[0]),
    }


def bench_layer(a) -> dict[str, TimingStats]:
    """Each layer call unpatched and patched (outputs checked first), and the layer's projections alone."""
    cases = {}
    with torch.no_grad():
        calls = layer_calls(a)
        for name, (module, call) in calls.items():
            ref, out = toggled(module, False, call)(), toggled(module, True, call)()
            refuse_if_differs(f"{name}", rel_err(out, ref))
            print(f"  patched {name} used {hf_minimax.report(module).layers[0].calls}")
            cases[f"{name} unpatched"] = toggled(module, False, call)
            cases[f"{name} patched"] = toggled(module, True, call)
        m = calls["layer"][0]
        x = torch.randn(1, a.n, a.hidden)
        width = a.heads * a.head_dim
        cases["projections"] = lambda: m.out_proj(m.output_gate(x) * m.qkv_proj(x)[..., :width])
        return interleaved(cases, rounds=a.rounds)


def greedy_decode(model, prompt: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """Prefill (not timed), then `steps` greedy tokens from the cache; seconds per token and the tokens."""
    out = model(prompt, use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    generated = [token]
    start = time.perf_counter()
    for _ in range(steps):
        out = model(token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        generated.append(token)
    return (time.perf_counter() - start) / steps, torch.cat(generated, 1)


def bench_decode(a) -> tuple[TimingStats, TimingStats]:
    torch.manual_seed(0)
    model = small_model(a.layers, a.model_hidden, a.model_heads, a.model_head_dim, a.vocab)
    prompt = torch.randint(0, a.vocab, (a.batch, a.prompt))
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.no_grad():
        _, ref = toggled(model, False, lambda: greedy_decode(model, prompt, a.steps))()
        _, got = toggled(model, True, lambda: greedy_decode(model, prompt, a.steps))()
        if not torch.equal(got, ref):
            raise SystemExit("model decode: patched and unpatched generate different tokens: no speed is reported")
        print(f"model decode: {a.steps} greedy tokens identical patched and unpatched")
        print(hf_minimax.report(model))
        for _ in range(a.rounds):
            for patch in (False, True):
                times[patch].append(toggled(model, patch, lambda: greedy_decode(model, prompt, a.steps))()[0])
    return TimingStats(times[False]), TimingStats(times[True])


def row(name: str, s: TimingStats, unit: float, label: str) -> str:
    return f"{name:60s} {s.median * unit:10.2f} {s.min * unit:9.2f}..{s.max * unit:<9.2f} {label}"


def main(argv=None) -> None:
    # the layer benchmark's shape, then the decode model's
    p = arguments(__doc__, hidden=1024, heads=8, head_dim=128, model_hidden=256, model_heads=4, model_head_dim=64,
                  vocab=512, prompt=512, steps=32, rounds=5)  # fmt: skip
    p.add_argument("--n", type=int, default=8192, help="prefill length of the layer benchmark")
    p.add_argument("--continue-n", type=int, default=2048, help="new tokens after a cached state, one call")
    p.add_argument("--layers", type=int, default=8, help="layers of the decode model")
    p.add_argument("--batch", type=int, default=1, help="batch of the decode model")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--parts", default="layer,decode", help="what to run: layer, decode or both")
    a = p.parse_args(argv)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    header("transformers MiniMax: unpatched vs leetdecoding.integrations.hf_minimax, fp32")
    print(f"# command: python -m benchmarks.hf_minimax {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip())
    parts = set(a.parts.split(","))
    if not parts <= {"layer", "decode"}:
        raise SystemExit(f"--parts takes layer, decode or both; got {a.parts!r}")
    layer = bench_layer(a) if "layer" in parts else None
    decode = bench_decode(a) if "decode" in parts else None
    print(f"{'':60s} {'median':>10s} {'min..max':>20s}")
    speedups = []
    if layer is not None:
        shape = f"B=1 N={a.n}, hidden {a.hidden}, {a.heads}x{a.head_dim}"
        print(row(f"layer prefill ({shape}): unpatched", layer["layer unpatched"], 1e3, "ms"))
        print(row("layer prefill: patched", layer["layer patched"], 1e3, "ms"))
        print(row("  its projections alone (both sides run them)", layer["projections"], 1e3, "ms"))
        print(row("layer attention core (identity projections): unpatched", layer["core unpatched"], 1e3, "ms"))
        print(row("layer attention core: patched", layer["core patched"], 1e3, "ms"))
        what = f"layer, {a.continue_n} new tokens after a cached state"
        print(row(f"{what}: unpatched", layer["continue unpatched"], 1e3, "ms"))
        print(row(f"{what}: patched", layer["continue patched"], 1e3, "ms"))
        for name, label in (("layer", "layer prefill"), ("core", "its attention core"), ("continue", "continuation")):
            speedups.append(f"{label} {layer[name + ' unpatched'].median / layer[name + ' patched'].median:.2f}x")
    if decode is not None:
        hf_tok, ours_tok = decode
        model = f"B={a.batch}, {a.layers} layers, hidden {a.model_hidden}, {a.model_heads}x{a.model_head_dim}"
        print(row(f"model decode ({model}): unpatched", hf_tok, 1e3, "ms/token"))
        print(row("model decode: patched", ours_tok, 1e3, "ms/token"))
        speedups.append(f"model decode per token {hf_tok.median / ours_tok.median:.2f}x")
    print(f"speed-up (medians over {a.rounds} rounds): " + ", ".join(speedups))


if __name__ == "__main__":
    main()
