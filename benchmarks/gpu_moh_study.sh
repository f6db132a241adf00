#!/usr/bin/env bash
# Issue 15, part 3: the MoH study at millions of tokens, in one call on the lent GPU machine.
#
# Here, once:    python scripts/device_bundle.py pack          (two carried folders of about 55 MB)
# Device call 1: carry [".cache/device/a"], command `true`     (the first half of the GGUF; the machine stays warm
#                                                               30 s, so make call 2 at once)
# Device call 2: carry [".cache/device/b"], timeout 600,
#                command `bash benchmarks/gpu_moh_study.sh`     (writes report.md/json and gap.png into $OUT)
# CPU smoke:     bash benchmarks/gpu_moh_study.sh --smoke       (the same steps on the CPU with tiny budgets)
#
# The study: dense, `ranked` MoH (the retrofit of the CPU study's longest runs) and `ranked_topk` (its router fitted
# as a top-3 classifier: the best at 16k tokens on the CPU) on SmolLM2-135M-Instruct, in that order, continue-tuned on
# the Python and Linux kernel documentation (9.3M training tokens) with `--schedule wsd`, batch 64 x 256 tokens, bf16
# autocast; held-out perplexity on 256 blocks of Python documentation pages no run trains on. Three stages, each
# under the deadline, so that a slower machine still reports the first ones: 4M tokens, then 16M (4M a decay branch
# of it), then 32M (3.4 passes over the data). Whatever is evaluated when the time is up is reported. (An estimate,
# not a measurement: 150-500k tokens/s for a 135M model in bf16 on one H100, so 16M tokens take 0.5-2 minutes.)
set -uo pipefail
START=$SECONDS
# seconds for the stages: the call's limit is 600, the report and the copy need the rest (the CPU smoke: 30 minutes)
DEADLINE=${DEADLINE:-$([ "${1:-}" = "--smoke" ] && echo 1800 || echo 555)}
OUT=${OUT:-/tmp/gpu_moh_study_out}
ASSETS=${ASSETS:-/tmp/assets}
STUDY=${STUDY:-/tmp/moh_study_gpu}
mkdir -p "$OUT"

if [ "${1:-}" = "--smoke" ]; then
    # tiny budgets and batches on the CPU, no wheels (this machine has the packages), the bundle packed if missing
    [ -f .cache/device/b/manifest.json ] || python scripts/device_bundle.py pack --no-wheels || exit 1
    rm -rf "$STUDY"  # a smoke starts over (on the GPU machine a second call resumes what the first one cached)
    if [ "${SMOKE_WHEELS:-0}" = 1 ]; then UNPACK=(); else UNPACK=(--no-wheels); fi
    STAGES=("0 2048" "0 2048 8192")
    SETTINGS=(train.batch_size=2 train.save_steps=null optim.warmup_steps=1)
    BLOCKS=4
    VARIANTS=(dense ranked)  # ranked_topk differs only in its init options (its 32k-token fit takes minutes on a CPU)
    PYTHON=${PYTHON:-python}
else
    UNPACK=()
    STAGES=("0 4194304" "0 4194304 16777216" "0 4194304 16777216 33554432")
    # data.num_proc stays unset: processes shard the packing, which changes the blocks (a CPU rerun would differ)
    SETTINGS=(train.batch_size=64 train.mixed_precision=bf16 train.save_steps=256 train.logging_steps=16
              optim.warmup_steps=16)
    BLOCKS=256
    VARIANTS=(dense ranked ranked_topk)
    PYTHON=${PYTHON:-python3}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
fi
export PYTHONUNBUFFERED=1
"$PYTHON" scripts/device_bundle.py unpack --src .cache/device --dest "$ASSETS" "${UNPACK[@]}" || exit 1
# shellcheck disable=SC1091
source "$ASSETS/env.sh"
"$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$OUT/device.txt"

STUDY_ARGS=(moh-study --schedule wsd --variants "${VARIANTS[@]}" --tasks --ppl-blocks "$BLOCKS" --out "$STUDY"
            --set "${SETTINGS[@]}" "data.sources=[{corpus: python_docs}, {corpus: linux_docs}]")
for budgets in "${STAGES[@]}"; do
    left=$((DEADLINE - (SECONDS - START)))
    [ "$left" -gt 60 ] || { echo "gpu_moh_study: $left s left; skipping the budgets $budgets"; break; }
    echo "gpu_moh_study: budgets $budgets, $left s left"
    # shellcheck disable=SC2086
    timeout --signal=INT "$left" "$PYTHON" -m hf_attn_zoo "${STUDY_ARGS[@]}" --budgets $budgets \
        2>&1 | grep -v -E "it/s\]|s/it\]" | tail -n 40
done
"$PYTHON" -m hf_attn_zoo "${STUDY_ARGS[@]}" --report-only 2>&1 | tail -n 60
cp "$STUDY/report.md" "$STUDY/report.json" "$STUDY/gap.png" "$OUT/" 2>/dev/null
ls -la "$OUT"
echo "gpu_moh_study: done in $((SECONDS - START)) s"
