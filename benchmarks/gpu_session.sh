#!/usr/bin/env bash
# Everything one GPU session measures, in one call (the device keeps nothing between calls), most
# valuable first, each step's output in $OUT (or ./gpu_out) as soon as it ends, so a call stopped at
# the device's 600 s limit keeps what finished:
#   1. the GPU tests (kernels against the reference at real sizes, memory target at 64k),
#   2. the full side-by-side benchmark (benchmarks/attention.py): JSON, markdown table and plot,
#   3. each change since the last H100 table alone (attention.py --ab, NOTES_routing.md v5),
#   4. the host-time profile of our eager forward+backward and the kernel profile at 64k,
#   5. the tile sweep at 64k.
# The PyPI peer is installed from .whl/ when present (carry .whl):
#   python3 -m pip download --no-deps -d .whl routing-transformer==1.6.1 local-attention==1.4.4 \
#       product-key-memory==0.1.11 mixture-of-experts==0.2.3
# Usage: bash benchmarks/gpu_session.sh [--quick]   (--quick: T = 8k and 64k, no peer or FlexAttention)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/device.txt"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$out/device.txt"

python3 -m pytest -q -m gpu tests/ > "$out/gpu_tests.txt" 2>&1
echo "gpu tests: $(tail -1 "$out/gpu_tests.txt")"
if [[ "${1:-}" == "--quick" ]]; then
    args=(--T 8192,65536 --rows "ours topk,ours nearest,dense,graph")
else
    args=()
fi
python3 benchmarks/attention.py "${args[@]}" --out "$out/bench.json" --md "$out/bench.md" > "$out/bench.log" 2>&1
echo "benchmark exit $?"
python3 benchmarks/plot_results.py "$out/bench.json" "$out/bench.png" || true
python3 benchmarks/attention.py --ab 8192,65536 --out "$out/ab.json" > "$out/ab.txt" 2>&1
python3 benchmarks/attention.py --cpu-profile 8192 > "$out/host_profile.txt" 2>&1
python3 benchmarks/attention.py --profile 65536 > "$out/kernel_profile.txt" 2>&1
python3 benchmarks/attention.py --sweep 65536 > "$out/sweep.txt" 2>&1
grep -E "passed|failed|error" "$out/gpu_tests.txt" | tail -3
grep "^|" "$out/ab.txt"
cat "$out/bench.md" 2>/dev/null || tail -20 "$out/bench.log"
