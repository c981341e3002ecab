import importlib.util
import os

# Before leetdecoding is imported: outputs are allocated NaN-filled, so an unwritten row cannot hide.
os.environ["LEETDECODING_DEBUG_NAN"] = "1"
os.environ.pop("LEETDECODING_METHOD", None)
os.environ["LEETDECODING_TUNING"] = "off"  # the dispatcher's defaults, whatever `leetdecoding tune` wrote here

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, the Triton methods run on CPU tensors in Triton's interpreter. The variable is read when the
# kernels are decorated, so it is set here, before anything imports leetdecoding; never where CUDA can run the
# real kernels, and never over an explicit TRITON_INTERPRET.
if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The interpreter runs a kernel one Python operation at a time: a per-token loop over 65536 tokens takes minutes.
# These run on a GPU (benchmarks/gpu_check.sh); tests/test_triton.py covers the same kernels on short sequences.
TOO_SLOW_FOR_THE_INTERPRETER = {
    "test_long_sequence_any_decay[triton_recurrent]",
    "test_long_sequence_any_decay[triton_fleet]",
}


def _triton_method_param(item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(p, str) and p.startswith("triton_") for p in params.values())


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") == "1":
        skip = pytest.mark.skip(reason="too slow in Triton's interpreter; runs on a GPU (benchmarks/gpu_check.sh)")
        for item in items:
            if item.name in TOO_SLOW_FOR_THE_INTERPRETER:
                item.add_marker(skip)
        return
    # The generic suites pass CPU tensors, which the Triton methods take only under the interpreter; on a CUDA
    # machine tests/test_triton.py runs them on the GPU instead.
    skip = pytest.mark.skip(reason="Triton method on CPU tensors needs TRITON_INTERPRET=1; see tests/test_triton.py")
    for item in items:
        if item.module.__name__ != "tests.test_triton" and _triton_method_param(item):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
