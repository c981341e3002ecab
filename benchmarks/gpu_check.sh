#!/usr/bin/env bash
# GPU check of the Triton methods, in one run on one GPU (a few minutes on an H100):
#   1. the GPU tests: tests/test_triton.py on CUDA tensors (compiled kernels, bf16, no recompilation, memory,
#      torch.compile), then the generic reference tests (their Triton rows run on CPU tensors and are skipped);
#   2. tests/test_compile.py (fullgraph compile, export, opcheck) and benchmarks/cuda_graph_decode.py (the decode
#      step captured in a CUDA graph and compiled with reduce-overhead, 64 tokens against eager);
#   3. benchmarks/gpu_bench.py: triton_chunked forward and forward+backward and the fused decode step against
#      fla's simple GLA kernels, transformers' MiniMax loop and the torch chunked method, packed sequences,
#      with a summary;
#   4. `leetdecoding tune --dry-run` in bf16: which chunk sizes this GPU prefers (nothing written).
#
#   bash benchmarks/gpu_check.sh                  # from anywhere; extra arguments go to gpu_bench.py
#
# Nothing is downloaded: wheels carried in .whl/ at the repository root (fla, transformers, pytest, ...) are
# installed offline into /tmp/site, which goes first on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}

if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || echo "# warning: wheel install failed"
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
unset TRITON_INTERPRET LEETDECODING_METHOD  # the real kernels, the real dispatcher

"$PY" - <<'EOF'
import importlib.metadata as md, torch
names = ("torch", "triton", "flash-linear-attention", "fla-core", "transformers", "pytest")
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "-"
print("# " + "  ".join(f"{n} {version(n)}" for n in names))
print("# cuda:", torch.cuda.is_available() and torch.cuda.get_device_name())
EOF

status=0
echo "## tests/test_triton.py (GPU)"
timeout 300 "$PY" -m pytest tests/test_triton.py -q -x -p no:cacheprovider -rs || status=1
echo "## tests/test_methods.py (CPU reference tests; the long cases are left to CI)"
timeout 150 "$PY" -m pytest tests/test_methods.py -q -x -p no:cacheprovider -k "not 1000 and not long_sequence" || status=1
echo "## tests/test_compile.py and the decode step in a CUDA graph (64 tokens replayed against eager)"
timeout 200 "$PY" -m pytest tests/test_compile.py -q -x -p no:cacheprovider || status=1
timeout 120 "$PY" -m benchmarks.cuda_graph_decode || status=1
echo "## benchmarks/gpu_bench.py"
timeout 300 "$PY" -m benchmarks.gpu_bench "$@" || status=1
echo "## leetdecoding tune (bf16, dry run: chunk sizes of chunked and triton_chunked on this GPU)"
timeout 120 "$PY" -m leetdecoding tune --device cuda --dtype bfloat16 --dry-run || status=1
echo "## gpu_check exit status: $status"
exit $status
