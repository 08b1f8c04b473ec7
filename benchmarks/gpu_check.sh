#!/usr/bin/env bash
# One GPU, at most ~8 minutes: the throughput table at 128x128 ch 96 (method s3gan, batch 256 and
# 512 per GPU, bf16 and fp32, eager and compiled, channels_last), the data loader alone on a folder
# of JPEGs, then the demo on the GPU. Run from anywhere; everything is appended to
# $OUT/gpu_log.txt, and the demo's final picture is copied to $OUT/demo_final.png.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#
# Each part has its own timeout (one slow compile cannot take the whole budget) and parts are
# skipped once the budget (BUDGET seconds, DEMO_RESERVE of them kept for the demo) is spent.
# Sizes and the device are environment variables, so that the script can be tried on a CPU:
#   OUT=/tmp/g DEVICE=cpu RES=32 CH=4 NUM_CLASSES=10 B1=8 B2=16 WARMUP=1 STEPS=1 DEMO_STEPS=2 \
#     TIMEOUT_SCALE=4 SKIP_COMPILE=1 BUDGET=2000 DEMO_RESERVE=300 bash benchmarks/gpu_check.sh
# (SKIP_COMPILE: torch.compile on a CPU takes minutes; test_compiled_step_equals_eager_step
# covers the compiled path there.)
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output folder}"
DEVICE=${DEVICE:-cuda} RES=${RES:-128} CH=${CH:-96} NUM_CLASSES=${NUM_CLASSES:-1000}
B1=${B1:-256} B2=${B2:-512} WARMUP=${WARMUP:-3} STEPS=${STEPS:-5}
BUDGET=${BUDGET:-470} DEMO_RESERVE=${DEMO_RESERVE:-170} DEMO_STEPS=${DEMO_STEPS:-0}
TIMEOUT_SCALE=${TIMEOUT_SCALE:-1} SKIP_COMPILE=${SKIP_COMPILE:-0} PY=${PY:-python3}
mkdir -p "$OUT"
LOG=$OUT/gpu_log.txt
start=$(date +%s)

log() { echo "$@" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - start) )); }

# part NAME LIMIT_S COMMAND...: run with a timeout, cut to the time left before the demo's reserve
part() {
  local name=$1 limit=$2 avail t rc
  shift 2
  limit=$(( limit * TIMEOUT_SCALE ))
  if [[ $SKIP_COMPILE == 1 && " $* " == *" --compile yes "* ]]; then
    log "## $name: skipped (SKIP_COMPILE=1)"; return
  fi
  avail=$(( $(left) - DEMO_RESERVE ))
  (( limit > avail )) && limit=$avail
  if (( limit < 30 )); then log "## $name: skipped, time budget spent"; return; fi
  log "## $name (timeout ${limit}s): $*"
  t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  log "## $name: exit $rc after $(( $(date +%s) - t ))s$( ((rc == 124)) && echo ' (timed out)')"
}

log "## gpu_check $(date -u +%FT%TZ) on $(hostname), $(nproc) CPU cores, git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi -L 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>&1 | tee -a "$LOG"
log "C compiler (Triton and Inductor need one): $(command -v gcc || command -v cc || echo none)"
if ! "$PY" -c 'import torch, numpy, PIL' 2>&1 | tee -a "$LOG"; then
  log "## $PY cannot import torch, numpy and PIL; nothing can be measured (no network here)"
  exit 1
fi
"$PY" -c 'import torch; print("torch", torch.__version__, "| CUDA", torch.version.cuda,
  "| cuDNN", torch.backends.cudnn.version(), "| available:", torch.cuda.is_available())' \
  2>&1 | tee -a "$LOG"

BENCH=("$PY" benchmarks/throughput.py --device "$DEVICE" --resolution "$RES" --ch "$CH"
       --num-classes "$NUM_CLASSES" --method s3gan --warmup "$WARMUP" --steps "$STEPS")
# In order of importance: the MFU figure and the layout first, then compiling (a cold compile of
# the 128x128 model took over 170 s on an H200 with 16 cores), fp32, the loader, more rows.
part "bf16 eager batch $B1, NCHW and channels_last, profiled" 150 "${BENCH[@]}" --batch "$B1" \
  --precision bf16 --channels-last both --profile
part "bf16 compiled batch $B1" 270 "${BENCH[@]}" --batch "$B1" --precision bf16 --compile yes
part "fp32 eager batch $B1" 120 "${BENCH[@]}" --batch "$B1" --precision fp32
# a folder of ImageNet-sized JPEGs (about 500x375) for the data-loader timing
JPEGS=${JPEGS:-/tmp/s3gan_jpegs}
timeout 90 "$PY" - "$JPEGS" <<'EOF' 2>&1 | tee -a "$LOG"
import os, sys
from PIL import Image
import s3gan
root = sys.argv[1]
for c in range(4):
    os.makedirs(f'{root}/class{c}', exist_ok=True)
for i in range(512):
    path = f'{root}/class{i % 4}/{i:05d}.jpg'
    if not os.path.exists(path):
        Image.fromarray(s3gan.draw_shape(0, i, 500)).resize((500, 375)).save(path, quality=90)
print(f'{root}: 512 JPEGs of 500x375')
EOF
part "bf16 eager batch $B2, then the data loader" 100 "${BENCH[@]}" --batch "$B2" \
  --precision bf16 --data "$JPEGS" --loader-batches 10
part "bf16 compiled channels_last batch $B1" 270 "${BENCH[@]}" --batch "$B1" --precision bf16 \
  --compile yes --channels-last yes
part "bf16 compiled batch $B2" 200 "${BENCH[@]}" --batch "$B2" --precision bf16 --compile yes
part "fp32 compiled batch $B1" 200 "${BENCH[@]}" --batch "$B1" --precision fp32 --compile yes

# The demo (32x32 shapes, label stage + S3GAN) on the GPU, with whatever time is left.
DEMO_OUT=$OUT/demo
rm -rf "$DEMO_OUT"
DEMO_RESERVE=0 part "demo on $DEVICE" "$(left)" "$PY" -c "
import s3gan
steps = dict(steps=$DEMO_STEPS, pretrain_steps=$DEMO_STEPS) if $DEMO_STEPS else {}
s3gan.demo(device='$DEVICE', out='$DEMO_OUT', **steps)
"
[ -f "$DEMO_OUT/samples/final.png" ] && cp "$DEMO_OUT/samples/final.png" "$OUT/demo_final.png" &&
  log "## final picture: $OUT/demo_final.png"
rm -rf "$DEMO_OUT"   # weights are not needed back
log "## gpu_check done in $(( $(date +%s) - start ))s"
