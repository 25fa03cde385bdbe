#!/usr/bin/env bash
# Everything one GPU session measures, in as few calls as possible (the device keeps nothing between
# calls), most valuable first. Steps (default: all but ncu, in this order):
#   tests    the GPU tests (kernels against the reference at real sizes, memory target at 64k)
#   bench    the full side-by-side benchmark (benchmarks/attention.py): JSON, markdown table and plot
#   ab       each recent change alone (attention.py --ab, NOTES_routing.md v5)
#   host     the host-time profile of our eager forward+backward at 8k
#   hosttime the same host time split without a profiler: per Triton launch, the rest, an empty kernel
#   kernels  the kernel profile at 64k
#   local    local attention against FlexAttention, eager and CUDA-graph clocks (benchmarks/local_kernel.py)
#   lprofile the local kernels' GPU time per kernel at 64k, without and with Shaw tables
#   model    a whole model's training step, eager against torch.compile and CUDA graphs
#            (benchmarks/model_step.py; MODEL_ARGS is added, e.g. "--assign topk --optimizer preset")
#   sweep    the tile sweep at 64k (SWEEP_ARGS is added, e.g. "--sweep-parts fwd,bwd")
#   ncu      Nsight Compute on the routing attention kernels, one fwd+bwd per mode at 64k (where the
#            device's runtime lets ncu read the counters: H200.md)
#   ncusrc   Nsight Compute's per-instruction stall samples (SourceCounters) of topk's first launches of
#            NCU_KERNELS (default dq and dk/dv) at 64k: the SASS with its samples, one CSV per kernel, and
#            where the warps wait per loop and instruction (benchmarks/ncu_source_summary.py)
# Each step's output lands in $OUT/gpu_session.tgz (one archive, rewritten atomically after every
# step: the device returns at most 8 files, and a call stopped at its time limit keeps what finished).
# Each step also has its own time limit (STEP_LIMIT_S, default 300 s); PYTEST_ARGS replaces the tests
# step's default selection (tests/), e.g. one test id or `tests/ --deselect ID`; LOCAL_ARGS is added to
# the local step's command (e.g. "--sweep --sweep-T 65536"); AB_ONLY limits the ab step to these
# variants beside "all changes" (a comma list, e.g. AB_ONLY="argmax tiles 64x32"); NCU_KERNELS replaces
# the ncu step's kernel names (a regex alternation, e.g. "_scores_kernel"); PROFILE_VARIANT makes the
# kernels step also profile under one --ab variant (e.g. PROFILE_VARIANT="unpaired forward"), into
# variant_kernel_profile.txt beside the default's kernel_profile.txt.
# The PyPI peer is installed from .whl/ when present (carry .whl):
#   python3 -m pip download --no-deps -d .whl routing-transformer==1.6.1 local-attention==1.4.4 \
#       product-key-memory==0.1.11 mixture-of-experts==0.2.3
# Usage: bash benchmarks/gpu_session.sh [--quick] [STEP ...]
#   --quick: the benchmark at T = 8k and 64k only, without the peer or FlexAttention.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_out}"
work="$(mktemp -d)"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
limit="${STEP_LIMIT_S:-300}"

quick=0
steps=()
for a in "$@"; do
    case "$a" in
        --quick) quick=1 ;;
        tests|bench|ab|host|hosttime|kernels|local|lprofile|model|sweep|ncu|ncusrc) steps+=("$a") ;;
        *) echo "gpu_session.sh: unknown step '$a' (steps: tests bench ab host hosttime kernels local lprofile model sweep ncu ncusrc; flag: --quick)" >&2; exit 2 ;;
    esac
done
[[ ${#steps[@]} -eq 0 ]] && steps=(tests bench ab host kernels local lprofile sweep)

save() {  # archive everything so far; the rename makes a half-written archive impossible
    tar czf "$out/.gpu_session.tgz.tmp" -C "$work" . && mv "$out/.gpu_session.tgz.tmp" "$out/gpu_session.tgz"
}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    # The device's .git can lag the working tree it gets: the sources' hashes name what really ran
    # (src_sha1.txt in the archive; compare with the same command here).
    find src -name '*.py' -print0 | LC_ALL=C sort -z | xargs -0 sha1sum > "$work/src_sha1.txt"
    echo "src sha1 $(sha1sum < "$work/src_sha1.txt" | cut -c1-12)"
    python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
    date -u '+%Y-%m-%d %H:%M UTC'
} | tee "$work/device.txt"
save

run_step() {  # run_step NAME LOGFILE COMMAND...: time-limited, logged, archived
    local name="$1" log="$2" t0=$SECONDS rc
    shift 2
    timeout "$limit" "$@" > "$work/$log" 2>&1
    rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$work/steps.txt"
    save
}

for s in "${steps[@]}"; do
    case "$s" in
        tests)
            # faulthandler: a test still running after 60 s prints every thread's stack (a hang shows where)
            # shellcheck disable=SC2086
            # pytest-xdist, where installed: the tests' Triton compilations run on several CPU cores
            par=(); python3 -c "import xdist" 2> /dev/null && par=(-n 6)
            run_step tests gpu_tests.txt python3 -m pytest -v -m gpu "${par[@]}" --durations=15 \
                -o faulthandler_timeout=60 ${PYTEST_ARGS:-tests/}
            grep -E "passed|failed|error" "$work/gpu_tests.txt" | tail -3 ;;
        bench)
            if [[ $quick == 1 ]]; then
                args=(--T 8192,65536 --rows "ours topk,ours nearest,dense,graph")
            else
                args=()
            fi
            run_step bench bench.log python3 benchmarks/attention.py "${args[@]}" \
                --out "$work/bench.json" --md "$work/bench.md"
            python3 benchmarks/plot_results.py "$work/bench.json" "$work/bench.png" > /dev/null 2>&1 && save
            cat "$work/bench.md" 2>/dev/null || tail -20 "$work/bench.log" ;;
        ab)
            run_step ab ab.txt python3 benchmarks/attention.py --ab 8192,65536 --out "$work/ab.json" \
                ${AB_ONLY:+--ab-only "$AB_ONLY"}
            grep "^|" "$work/ab.txt" || tail -5 "$work/ab.txt" ;;
        host)
            run_step host host_profile.txt python3 benchmarks/attention.py --cpu-profile 8192
            tail -25 "$work/host_profile.txt" ;;
        hosttime)
            run_step hosttime host_time.txt python3 benchmarks/host_time.py --T 8192
            tail -20 "$work/host_time.txt" ;;
        kernels)
            run_step kernels kernel_profile.txt python3 benchmarks/attention.py --profile 65536
            tail -30 "$work/kernel_profile.txt"
            if [[ -n "${PROFILE_VARIANT:-}" ]]; then  # the variant beside the default, same call
                run_step kernels variant_kernel_profile.txt python3 benchmarks/attention.py --profile 65536 \
                    --variant "$PROFILE_VARIANT"
                tail -30 "$work/variant_kernel_profile.txt"
            fi ;;
        local)
            # shellcheck disable=SC2086
            run_step local local.txt python3 benchmarks/local_kernel.py --out "$work" ${LOCAL_ARGS:-}
            tail -30 "$work/local.txt" ;;
        lprofile)
            run_step lprofile local_profile.txt python3 benchmarks/local_kernel.py --profile 65536
            grep -E "==|_kernel|Self CUDA|aten::(zeros|mm|index_add)" "$work/local_profile.txt" | head -40 ;;
        model)
            # shellcheck disable=SC2086
            run_step model model_step.txt python3 benchmarks/model_step.py --out "$work/model_step.json" ${MODEL_ARGS:-}
            tail -8 "$work/model_step.txt" ;;
        sweep)
            # shellcheck disable=SC2086
            run_step sweep sweep.txt python3 benchmarks/attention.py --sweep 65536 ${SWEEP_ARGS:-}
            tail -40 "$work/sweep.txt" ;;
        ncu)
            ncu_bin="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2> /dev/null | head -1)"
            run_step ncu ncu.txt "${ncu_bin:-ncu}" --clock-control none --profile-from-start off \
                -k "regex:^(${NCU_KERNELS:-_fwd_kernel|_bwd_dq_kernel|_bwd_dkdv_kernel})\$" \
                --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
                --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section SchedulerStats \
                --metrics 'regex:^smsp__average_warps_issue_stalled_[a-z_]+_per_issue_active\.ratio$' \
                python3 benchmarks/attention.py --ncu 65536
            grep -E "_kernel|Duration|Registers Per|Achieved Occupancy|Compute \(SM\) Throughput|Memory Throughput|Stall|Warp Cycles Per Issued|Issue Slots Busy|Theoretical Occ|stalled" "$work/ncu.txt" | head -150 ;;
        ncusrc)
            ncu_bin="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2> /dev/null | head -1)"
            kernels="${NCU_KERNELS:-_bwd_dq_kernel|_bwd_dkdv_kernel}"
            # the profiling range starts with topk's fwd+bwd: its first launch of each kernel is topk's
            run_step ncusrc ncu_source.txt "${ncu_bin:-ncu}" --clock-control none --profile-from-start off \
                -k "regex:^(${kernels})\$" --launch-count "$(($(tr -cd '|' <<< "$kernels" | wc -c) + 1))" \
                --section SourceCounters --section WarpStateStats --section LaunchStats --section Occupancy \
                -o "$work/ncu_source" python3 benchmarks/attention.py --ncu 65536
            for k in ${kernels//|/ }; do
                "${ncu_bin:-ncu}" -i "$work/ncu_source.ncu-rep" -k "$k" --page source --csv --print-source sass \
                    > "$work/ncu_source_${k}.csv" 2>&1
            done
            "${ncu_bin:-ncu}" -i "$work/ncu_source.ncu-rep" --page details > "$work/ncu_source_details.txt" 2>&1
            rm -f "$work/ncu_source.ncu-rep"
            python3 benchmarks/ncu_source_summary.py "$work"/ncu_source_*.csv > "$work/ncu_source_summary.txt" 2>&1
            save
            grep -E "_kernel|Duration|Warp Cycles|Registers" "$work/ncu_source_details.txt" | head -20
            cat "$work/ncu_source_summary.txt" ;;
    esac
done
cat "$work/steps.txt"
