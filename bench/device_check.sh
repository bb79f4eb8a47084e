#!/usr/bin/env bash
# The checks that need a GPU, as one prepared command for a lent CUDA machine (issue #18: "when a GPU is
# available, run them there and record the numbers, with the fraction of the GPU's peak reached").
#
# Here, once per machine (the device has no network; its Python is 3.12 with torch, hypothesis, pytest,
# scipy, seaborn, jinja2, markdown-it-py and safetensors, but not mnist1d or lap):
#     bash bench/device_check.sh --fetch-wheels        # wheels for Python 3.12 into .whl/ (git-ignored)
# There (the session's device tool; ~8 minutes of its 15):
#     run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=570)
# What comes back under $OUT (at most 8 files): gpu.txt (nvidia-smi, torch, CUDA), gpu_tests.log (the `gpu`
# tests and the evaluator/curve/HVP tests on CUDA), RESULTS.md and bench.log (the CUDA benchmarks, with
# their `peak:` lines: the fraction of the GPU's measured float32 matmul peak), quick_cuda.log and
# quick_cuda.tgz (one target at quick size on CUDA; compare it with the CPU's: `python -m repro report`).
# Each step has its own time limit, so one that hangs leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "mnist1d==0.0.2.post1" "lap==0.5.13"
fi

OUT="${OUT:-/tmp/device_check}"
mkdir -p "$OUT"
: > "$OUT/gpu.txt"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
site=""
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>> "$OUT/gpu.txt" && site=/tmp/site
fi
export PYTHONPATH="$PWD${site:+:$site}"

{ nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"; } \
    >> "$OUT/gpu.txt" 2>&1
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "no CUDA device: nothing to check" | tee -a "$OUT/gpu.txt"; exit 1; }

# 1. the tests marked gpu (tests/ and invariants/props_gpu.py: CPU vs CUDA results, TF32's bound)
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests invariants > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests: exit $?" >> "$OUT/gpu_tests.log"

# 2. the benchmarks on CUDA (weight matching, the optimizer and pooling stay CPU checks)
timeout 270 python3 -m bench --device cuda --only evaluate hvp curves train_many --out "$OUT/RESULTS.md" \
    > "$OUT/bench.log" 2>&1
echo "bench: exit $?" >> "$OUT/bench.log"

# 3. one target end to end on CUDA at quick size (its outputs packed into one file)
timeout 120 python3 -m repro run ainsworth2023-mlp --quick --device cuda --no-progress --out /tmp/quick_cuda \
    --cache-dir /tmp/quick_cuda_cache > "$OUT/quick_cuda.log" 2>&1
echo "quick run: exit $?" >> "$OUT/quick_cuda.log"
[[ -d /tmp/quick_cuda ]] && tar czf "$OUT/quick_cuda.tgz" -C /tmp quick_cuda
exit 0
