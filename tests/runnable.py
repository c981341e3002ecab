"""The registered methods that can run on CPU tensors in this process: the torch methods, and the Triton ones where
Triton is installed and its interpreter is on (see conftest.py). On a CUDA machine the Triton methods are
tested on the GPU by tests/test_triton.py instead."""

from leetdecoding.methods import REGISTRY

RUNNABLE_ON_CPU = [n for n, m in REGISTRY.items() if m.unavailable_reason() is None and "cpu" in m.devices]
