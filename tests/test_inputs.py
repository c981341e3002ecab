"""Bad input gets a clear ValueError / TypeError at the boundary, naming the argument, expected and given."""

from __future__ import annotations

import math

import pytest
import torch

import leetdecoding as ld


def qkv(b=2, h=3, n=5, dk=4, dv=6, dtype=torch.float32):
    return (
        torch.randn(b, h, n, dk, dtype=dtype),
        torch.randn(b, h, n, dk, dtype=dtype),
        torch.randn(b, h, n, dv, dtype=dtype),
    )


def raises(exc, pattern, **kwargs):
    q, k, v = kwargs.pop("inputs", qkv())
    with pytest.raises(exc, match=pattern):
        ld.attention(q, k, v, **kwargs)


def test_wrong_ndim_names_argument_and_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have 4 dimensions .*got 3 dimensions, shape \(3, 5, 4\)"):
        ld.attention(q[0], k, v)
    with pytest.raises(ValueError, match=r"v must have 4 dimensions"):
        ld.attention(q, k, v[None])


@pytest.mark.parametrize(
    "shapes,label",
    [
        (((2, 3, 5, 4), (1, 3, 5, 4), (2, 3, 5, 6)), "batch B"),
        (((2, 3, 5, 4), (2, 3, 5, 4), (2, 2, 5, 6)), "heads H"),
        (((2, 3, 5, 4), (2, 3, 7, 4), (2, 3, 5, 6)), "length N"),
    ],
)
def test_mismatched_axes(shapes, label):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=f"must agree on {label}.*got q \\(2, 3, 5, 4\\)"):
        ld.attention(q, k, v)


def test_dk_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"same head dim Dk.*got q \(2, 3, 5, 4\), k \(2, 3, 5, 3\)"):
        ld.attention(q, k[..., :3], v)


def test_mixed_dtypes_and_devices():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"one dtype; got q torch.float32, k torch.float64"):
        ld.attention(q, k.double(), v)
    with pytest.raises(ValueError, match="one device"):
        ld.attention(q, k, v.to("meta"))


def test_integer_and_non_tensor_inputs():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q must be a floating tensor .*got torch.int64"):
        ld.attention(q.long(), k.long(), v.long())
    with pytest.raises(TypeError, match=r"k must be a torch.Tensor .*got list"):
        ld.attention(q, k.tolist(), v)


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5, math.nan, math.inf])
def test_decay_outside_unit_interval(bad):
    raises(ValueError, r"decay must be (in \(0, 1\]|finite)", decay=bad)


def test_decay_tensor_entries_and_shape():
    raises(ValueError, r"decay must be in \(0, 1\].*got 1.2", decay=torch.tensor([0.9, 1.2, 0.5]))
    raises(ValueError, r"decay must be a float or a tensor of shape \(3,\).*got shape \(2,\)", decay=torch.ones(2))
    raises(ValueError, r"shape \(3,\).*got shape \(3, 1, 1\).*reshape", decay=torch.ones(3, 1, 1))
    raises(TypeError, r"decay must be a float, an \(H,\) tensor or a per-token \(B, H, N\) tensor; got str",
           decay="0.9")  # fmt: skip


def test_log_decay_rules():
    raises(ValueError, r"log_decay must be <= 0.*got 0.1", log_decay=torch.tensor([-0.1, 0.1, 0.0]))
    raises(ValueError, r"log_decay must be finite", log_decay=-math.inf)
    raises(ValueError, r"either decay .* or log_decay .*not both", decay=0.9, log_decay=-0.1)


def test_initial_state_checks():
    raises(
        ValueError,
        r"initial_state must have shape \(2, 3, 4, 6\).*got \(2, 3, 6, 4\)",
        initial_state=torch.zeros(2, 3, 6, 4),
    )
    raises(TypeError, r"initial_state must be a floating torch.Tensor", initial_state=[[0.0]])


def test_scale_and_flags():
    raises(ValueError, r"scale must be finite; got nan", scale=math.nan)
    raises(TypeError, r"scale must be a real number; got str", scale="1")
    raises(TypeError, r"output_final_state must be a bool", output_final_state=1)


def test_unknown_method_lists_known_ones():
    raises(
        ValueError,
        r"unknown method 'flash'; known: auto, chunked, recurrent, vanilla, recursion, fleet",
        method="flash",
    )


def test_decay_dtype_is_the_one_silent_conversion():
    """An integer or fp64 decay tensor is accepted for fp32 inputs (its dtype is converted)."""
    q, k, v = qkv()
    a = ld.attention(q, k, v, decay=torch.ones(3, dtype=torch.int64))
    b = ld.attention(q, k, v, decay=torch.ones(3, dtype=torch.float64))
    c = ld.attention(q, k, v)
    assert torch.equal(a, c) and torch.equal(b, c)


def test_a_packed_initial_state_of_the_wrong_shape_names_the_packed_layout():
    q = torch.randn(1, 2, 10, 4)
    cu = torch.tensor([0, 3, 10])
    with pytest.raises(ValueError, match=r"initial_state must have shape \(2, 2, 4, 4\) \(S, H, Dk, Dv\), one state "
                       r"per sequence of cu_seqlens; got \(1, 2, 4, 4\)"):
        ld.attention(q, q, q, cu_seqlens=cu, initial_state=torch.zeros(1, 2, 4, 4))


def test_offsets_given_on_the_host_equal_the_tensor_call():
    q = torch.randn(1, 2, 12, 4, dtype=torch.float64)
    cu = torch.tensor([0, 5, 5, 12])
    want = ld.attention(q, q, q, decay=0.9, cu_seqlens=cu, output_final_state=True)
    for host in ([0, 5, 5, 12], cu):
        got = ld.attention(q, q, q, decay=0.9, cu_seqlens_cpu=host, output_final_state=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(ValueError, match=r"cu_seqlens_cpu must hold the values of cu_seqlens; got \[0, 6, 6, 12\]"):
        ld.attention(q, q, q, cu_seqlens=cu, cu_seqlens_cpu=[0, 6, 6, 12])
    with pytest.raises(ValueError, match=r"cu_seqlens_cpu must be non-decreasing; got cu_seqlens_cpu\[1\] = 7"):
        ld.attention(q, q, q, cu_seqlens_cpu=[0, 7, 5, 12])
    with pytest.raises(TypeError, match="cu_seqlens_cpu must be a list of ints or a CPU int tensor; got float"):
        ld.attention(q, q, q, cu_seqlens_cpu=0.5)
