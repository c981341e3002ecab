"""The decode step in a CUDA graph, as serving stacks run it: captured once and replayed for 64 tokens, and
compiled with torch.compile(mode="reduce-overhead", fullgraph=True), both against the eager steps (GPU only).

    python -m benchmarks.cuda_graph_decode          # prints the largest differences and times a replayed token
"""

from __future__ import annotations

import torch

import leetdecoding as ld

TOKENS = 64


def inputs(b=4, h=16, d=128, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(TOKENS, b, h, d, device="cuda", generator=g).to(dtype) for _ in range(3))
    return q, k, v, ld.decay.minimax(h, 3, 12).cuda()


def eager(q, k, v, log_decay):
    state = torch.zeros(*q.shape[1:], q.shape[-1], device="cuda")
    out = [ld.decode_step(q[t], k[t], v[t], state, log_decay=log_decay, out_state=state)[0] for t in range(TOKENS)]
    return torch.stack(out), state


def replayed(q, k, v, log_decay):
    """One token captured in a CUDA graph (after warm-up steps on a side stream), replayed per token."""
    static = [t[0].clone() for t in (q, k, v)]
    state = torch.zeros(*q.shape[1:], q.shape[-1], device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: the decay is checked and the kernel compiled before capture
            ld.decode_step(*static, state, log_decay=log_decay, out_state=state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o, _ = ld.decode_step(*static, state, log_decay=log_decay, out_state=state)
    state.zero_()
    out = []
    for t in range(TOKENS):
        for buffer, source in zip(static, (q, k, v)):
            buffer.copy_(source[t])
        graph.replay()
        out.append(o.clone())
    return torch.stack(out), state, graph


def compiled(q, k, v, log_decay):
    step = torch.compile(
        lambda q, k, v, s: ld.decode_step(q, k, v, s, log_decay=log_decay, out_state=s)[0],
        mode="reduce-overhead",
        fullgraph=True,
    )
    state = torch.zeros(*q.shape[1:], q.shape[-1], device="cuda")
    out = [step(q[t], k[t], v[t], state).clone() for t in range(TOKENS)]
    return torch.stack(out), state


def main() -> int:
    if not torch.cuda.is_available():
        print("# no CUDA GPU: nothing to capture")
        return 0
    q, k, v, log_decay = inputs()
    o_ref, s_ref = eager(q, k, v, log_decay)
    o_graph, s_graph, graph = replayed(q, k, v, log_decay)
    o_comp, s_comp = compiled(q, k, v, log_decay)
    status = 0
    for name, o, s in (("CUDA graph replay", o_graph, s_graph), ("compile reduce-overhead", o_comp, s_comp)):
        do = (o.float() - o_ref.float()).abs().max().item()
        ds = (s - s_ref).abs().max().item()
        ok = do == 0 and ds == 0  # the same kernel on the same inputs: bit for bit
        status |= not ok
        verdict = "ok" if ok else "DIFFERS"
        print(f"{name}: {TOKENS} tokens, max |o - eager| {do:.3g}, max |state - eager| {ds:.3g} {verdict}")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(100):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    print(f"replayed decode step (B=4, H=16, D=128, bf16): {start.elapsed_time(end) * 10:.1f} us per token")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
