"""Generate with transformers' MiniMax, unpatched and then patched by leetdecoding; print the speed of each.

    python examples/minimax_generate.py                       # fp32, prompt 2048, 32 new tokens
    python examples/minimax_generate.py --dtype bfloat16      # the patched state stays fp32

The model is small and random (no download): 8 layers, every fourth one full attention, the others MiniMax's
lightning (linear) attention, as in MiniMax-Text-01.
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import MiniMaxConfig, MiniMaxForCausalLM

from leetdecoding.integrations import hf_minimax


def build_model(dtype: torch.dtype, layers: int = 8, hidden: int = 256, vocab: int = 512) -> MiniMaxForCausalLM:
    torch.manual_seed(0)
    config = MiniMaxConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        layer_types=["full_attention" if i % 4 == 0 else "linear_attention" for i in range(layers)],
        num_local_experts=2,
        num_experts_per_tok=1,
        max_position_embeddings=8192,
        eos_token_id=None,
    )
    return MiniMaxForCausalLM(config).eval().to(dtype)


def best_of(repeats: int, fn) -> float:
    """The fastest of `repeats` timed calls of `fn`, in seconds (the least disturbed by other work)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(model, prompt: torch.Tensor, new_tokens: int, repeats: int = 3) -> dict:
    """Generated tokens, prefill seconds and seconds per generated token (one forward each from the cache)."""
    tokens = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, cache=hf_minimax.LeetMiniMaxCache())
    prefill = best_of(repeats, lambda: model(prompt, cache=hf_minimax.LeetMiniMaxCache(), use_cache=True))

    def decode():
        out = model(prompt, cache=hf_minimax.LeetMiniMaxCache(), use_cache=True)  # not timed
        token, cache = out.logits[:, -1:].argmax(-1), out.cache
        start = time.perf_counter()
        for _ in range(new_tokens):
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        return time.perf_counter() - start

    per_token = min(decode() for _ in range(repeats)) / new_tokens
    return {"tokens": tokens, "prefill": prefill, "per_token": per_token}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", type=int, default=2048, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args()
    model = build_model(getattr(torch, a.dtype))
    prompt = torch.randint(0, model.config.vocab_size, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        run(model, prompt[:, :64], 2)  # warm up
        before = run(model, prompt, a.new_tokens)
        print(hf_minimax.patch(model))
        run(model, prompt[:, :64], 2)
        after = run(model, prompt, a.new_tokens)
    same = torch.equal(before["tokens"], after["tokens"])
    print(f"\n{a.dtype}, prompt {a.prompt} tokens, {a.new_tokens} new tokens; generated tokens identical: {same}")
    if not same and a.dtype != "float32":
        print("(unpatched keeps the state in the model dtype, patched in fp32: rounding can change a close token)")
    print(f"{'':10s} {'prefill ms':>11s} {'ms / token':>11s}")
    for name, r in (("unpatched", before), ("patched", after)):
        print(f"{name:10s} {r['prefill'] * 1e3:11.1f} {r['per_token'] * 1e3:11.2f}")
    print(f"speed-up   {before['prefill'] / after['prefill']:10.2f}x {before['per_token'] / after['per_token']:10.2f}x")
    print("last generated tokens:", after["tokens"][0, -8:].tolist())
    hf_minimax.unpatch(model)


if __name__ == "__main__":
    main()
