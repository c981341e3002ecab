"""The peers that benchmarks/cpu_peers.py times, loaded without their GPU-only parts.

Each loader returns callables or raises PeerUnavailable with a reason to print. Downloads happen once, into
CACHE (~/.cache/leetdecoding-bench, or $LEETDECODING_BENCH_CACHE), with pip, never into the environment:

- LeetDecoding 0.0.3: its package compiles CUDA and probes NVML at import, so the source distribution is
  downloaded and only BlockBased.py (with linear_attn.py, and a stub for its CUDA causal_dot_product, used only
  without a decay) and lightningAttention2_torch.py are loaded by path.
- fla's naive chunk function: an installed `fla` if there is one, else fla-core (pinned) and einops installed with
  `pip install --target CACHE/fla --no-deps`; only ops/simple_gla/naive.py is loaded, by path (importing `fla.ops`
  imports every Triton kernel, about 6 s and a warning on CPU). einops comes from that folder, appended to sys.path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path

CACHE = Path(os.environ.get("LEETDECODING_BENCH_CACHE", "~/.cache/leetdecoding-bench")).expanduser()
LEETDECODING_VERSION = "0.0.3"
FLA_CORE_VERSION = "0.6.0"


class PeerUnavailable(Exception):
    """A peer that cannot run here; the message says why."""


def _load_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _modules(entries: dict[str, types.ModuleType]):
    """Make `entries` importable while a file is loaded; sys.modules is restored afterwards."""
    saved = {name: sys.modules.get(name) for name in entries}
    sys.modules.update(entries)
    try:
        yield
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _pip(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PeerUnavailable(f"pip {args[0]} failed: {last}")


def _leetdecoding_source() -> Path:
    """The extracted leetDecoding/methods folder of the 0.0.3 source distribution, downloaded once."""
    root = CACHE / f"leetDecoding-{LEETDECODING_VERSION}"
    if not root.is_dir():
        CACHE.mkdir(parents=True, exist_ok=True)
        sdists = list(CACHE.glob(f"[lL]eet[dD]ecoding-{LEETDECODING_VERSION}.tar.gz"))
        if not sdists:
            spec = f"leetdecoding=={LEETDECODING_VERSION}"
            _pip("download", spec, "--no-deps", "--no-binary", ":all:", "-d", str(CACHE))
            sdists = list(CACHE.glob(f"[lL]eet[dD]ecoding-{LEETDECODING_VERSION}.tar.gz"))
        if not sdists:
            raise PeerUnavailable(f"pip download left no leetDecoding-{LEETDECODING_VERSION}.tar.gz in {CACHE}")
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(CACHE, filter="data")
    return root / "leetDecoding" / "methods"


def leetdecoding_003() -> dict:
    """{"block-based": f, "lightningAttention2_torch": f}, each f(q, k, v, gamma): q, k, v (B, H, N, D), gamma (H,)
    with lambda = exp(-gamma), as the original's ATTENTION_MAP names them."""
    methods = _leetdecoding_source()

    def cuda_only(*args, **kwargs):
        raise RuntimeError("LeetDecoding's causal_dot_product is CUDA-only and was not loaded")

    linear_attn = _load_file("_leetdecoding003_linear_attn", methods / "linear_attn.py")
    stub = types.ModuleType("leetDecoding.methods.causal_dot_product")
    stub.causal_dot_product = cuda_only
    entries = {
        "leetDecoding": types.ModuleType("leetDecoding"),
        "leetDecoding.methods": types.ModuleType("leetDecoding.methods"),
        "leetDecoding.methods.linear_attn": linear_attn,
        "leetDecoding.methods.causal_dot_product": stub,
    }
    with _modules(entries):
        block = _load_file("_leetdecoding003_BlockBased", methods / "BlockBased.py")
    light = _load_file("_leetdecoding003_lightningAttention2_torch", methods / "lightningAttention2_torch.py")
    return {"block-based": block.blockBased, "lightningAttention2_torch": light.lightningAttention2_torch}


def fla_naive_chunk():
    """fla's naive_chunk_simple_gla(q, k, v, g, scale=...) -> (o, state): q, k, v (B, T, H, D), g (B, T, H) the
    per-token log decay; computes in fp32 and returns o (B, T, H, D) in fp32."""
    spec = importlib.util.find_spec("fla")
    if spec is not None and spec.submodule_search_locations:
        package = Path(list(spec.submodule_search_locations)[0])
    else:
        target = CACHE / "fla"
        package = target / "fla"
        if not (package / "ops" / "simple_gla" / "naive.py").is_file():
            _pip("install", "--target", str(target), "--no-deps", f"fla-core=={FLA_CORE_VERSION}", "einops")
        if importlib.util.find_spec("einops") is None:
            sys.path.append(str(target))
    naive = package / "ops" / "simple_gla" / "naive.py"
    if not naive.is_file():
        raise PeerUnavailable(f"no {naive} (an fla without the naive simple_gla functions)")
    if importlib.util.find_spec("einops") is None:
        raise PeerUnavailable("einops, which fla's naive.py imports, is not importable")
    return _load_file("_fla_simple_gla_naive", naive).naive_chunk_simple_gla
