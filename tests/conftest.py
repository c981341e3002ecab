import os

# Before leetdecoding is imported: outputs are allocated NaN-filled, so an unwritten row cannot hide.
os.environ["LEETDECODING_DEBUG_NAN"] = "1"
os.environ.pop("LEETDECODING_METHOD", None)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
