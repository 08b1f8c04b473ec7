#!/usr/bin/env bash
# One GPU, at most ~8 minutes, parts in order of importance (issue 22), with rough H200 times:
# D's pooling variants side by side (~25 s); the compiled bf16 step at 128x128 ch 96 batch 256
# with its profile, MFU against 40% (~170 s, a cold compile); the eager rows, bf16 and fp32,
# NCHW and channels_last, MFU against 25% (~80 s); the data loader on this host's cores over
# ImageNet-sized JPEGs, img/s per worker, with and without Pillow's draft (~40 s); an end-to-end
# training run over those JPEGs, img/s from its log against the step alone (~200 s, compiles
# again); then, if time is left, bf16 batch 512, compiled channels_last, and CUDA graphs
# (mode="reduce-overhead") for the demo-sized model. Everything is appended to $OUT/gpu_log.txt.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh
#
# Each part has its own timeout (one slow compile cannot take the whole budget) and parts are
# skipped once the budget (BUDGET seconds) is spent. Sizes and the device are environment
# variables, so that the script can be tried on a CPU (SKIP_COMPILE: torch.compile on a CPU
# takes minutes; test_compiled_and_channels_last_steps_equal_the_default_step covers it there):
#   OUT=/tmp/g DEVICE=cpu RES=32 CH=4 NUM_CLASSES=10 B1=8 B2=16 WARMUP=1 STEPS=1 IMAGES=16 \
#     E2E_STEPS=2 E2E_CLASSES=10 POOL_BATCH=2 TIMEOUT_SCALE=4 SKIP_COMPILE=1 BUDGET=2000 \
#     bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the output folder}"
DEVICE=${DEVICE:-cuda} RES=${RES:-128} CH=${CH:-96} NUM_CLASSES=${NUM_CLASSES:-1000}
B1=${B1:-256} B2=${B2:-512} WARMUP=${WARMUP:-3} STEPS=${STEPS:-5} BUDGET=${BUDGET:-470}
IMAGES=${IMAGES:-512} E2E_STEPS=${E2E_STEPS:-100} E2E_CLASSES=${E2E_CLASSES:-1000}
POOL_BATCH=${POOL_BATCH:-64} TIMEOUT_SCALE=${TIMEOUT_SCALE:-1} SKIP_COMPILE=${SKIP_COMPILE:-0}
PY=${PY:-python3}
mkdir -p "$OUT"
LOG=$OUT/gpu_log.txt
start=$(date +%s)

log() { echo "$@" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - start) )); }

# part NAME LIMIT_S COMMAND...: run with a timeout, cut to the time left in the budget
part() {
  local name=$1 limit=$2 avail t rc
  shift 2
  limit=$(( limit * TIMEOUT_SCALE ))
  if [[ $SKIP_COMPILE == 1 && " $* " == *" --compile "@(yes|both)" "* ]]; then
    log "## $name: skipped (SKIP_COMPILE=1)"; return
  fi
  avail=$(left)
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
"$PY" -c 'import torch, PIL; print("torch", torch.__version__, "| CUDA", torch.version.cuda,
  "| cuDNN", torch.backends.cudnn.version(), "| available:", torch.cuda.is_available(),
  "| Pillow", PIL.__version__)' 2>&1 | tee -a "$LOG"

BENCH=("$PY" benchmarks/throughput.py --device "$DEVICE" --resolution "$RES" --ch "$CH"
       --num-classes "$NUM_CLASSES" --method s3gan --warmup "$WARMUP" --steps "$STEPS")
# JPEGs and the end-to-end run outside $OUT: nothing large comes back, even after a timeout
WORK=${WORK:-/tmp/s3gan_gpu_check}
JPEGS=$WORK/jpegs E2E_DATA=$WORK/e2e_data E2E_OUT=$WORK/e2e
NPROC=$(nproc)

part "D pooling variants, bf16, batch $POOL_BATCH" 60 "$PY" benchmarks/pooling.py \
  --device "$DEVICE" --precision bf16 --resolution "$RES" --ch "$CH" --batch "$POOL_BATCH"
# a cold compile of the 128x128 model took over 170 s on an H200 with 16 cores
part "bf16 compiled batch $B1, profiled" 240 "${BENCH[@]}" --batch "$B1" --precision bf16 \
  --compile yes --profile
part "eager batch $B1: bf16 and fp32, NCHW and channels_last" 150 "${BENCH[@]}" --batch "$B1" \
  --precision bf16,fp32 --channels-last both
part "data loader on $NPROC host cores, $IMAGES JPEGs of 500x375" 90 "$PY" benchmarks/loader.py \
  --dir "$JPEGS" --images "$IMAGES" --resolution "$RES" --draft \
  --workers "1,$(( NPROC / 2 )),$(( NPROC > 1 ? NPROC - 1 : 1 ))"
# End to end: s3gan.py train over the JPEGs, one image per class in E2E_CLASSES class folders
# (links), so that G's and D's shapes are ImageNet's; S3GAN-CO (no label stage to wait for: the
# step is S3GAN's plus a 1536 -> 1000 linear head), every label known. img/s from log.jsonl.
rm -rf "$E2E_DATA" "$E2E_OUT"
[ -d "$JPEGS" ] && "$PY" - "$JPEGS" "$E2E_DATA" "$E2E_CLASSES" <<'EOF' 2>&1 | tee -a "$LOG"
import glob, os, sys
files, root, n = sorted(glob.glob(f'{sys.argv[1]}/*/*.jpg')), sys.argv[2], int(sys.argv[3])
for c in range(n):
    os.makedirs(f'{root}/c{c:04d}')
    os.symlink(os.path.abspath(files[c % len(files)]), f'{root}/c{c:04d}/{c}.jpg')
print(f'{root}: {n} classes of one JPEG each, linked from {len(files)} files')
EOF
part "end to end: s3gan.py train over JPEGs, bf16 compiled, batch $B1, $E2E_STEPS steps" 240 \
  "$PY" s3gan.py train --device "$DEVICE" --data "$E2E_DATA" --method s3gan-co \
  --labeled-fraction 1.0 --resolution "$RES" --ch "$CH" --batch-size "$B1" --precision bf16 \
  $( ((SKIP_COMPILE)) || echo --compile ) --steps "$E2E_STEPS" --log-every 20 \
  --sample-every 100000 --ckpt-every 100000 --snapshot-every 100000 --out "$E2E_OUT"
[ -f "$E2E_OUT/log.jsonl" ] && "$PY" - "$E2E_OUT/log.jsonl" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
rows = [r for r in map(json.loads, open(sys.argv[1])) if 'images_per_s' in r]
print('end to end, real img/s per log row:', [round(r['images_per_s']) for r in rows])
if len(rows) > 1:   # the first row includes the compile
    print(f'end to end after the first row: {sum(r["images_per_s"] for r in rows[1:]) / (len(rows) - 1):.0f} img/s')
EOF
rm -rf "$E2E_OUT" "$E2E_DATA"   # weights are not needed back
part "bf16 eager batch $B2" 90 "${BENCH[@]}" --batch "$B2" --precision bf16
part "bf16 compiled channels_last batch $B1" 200 "${BENCH[@]}" --batch "$B1" --precision bf16 \
  --compile yes --channels-last yes
# the demo's size (32x32, ch 16, 10 classes, batch 32): launch-bound; CUDA graphs if they pay
DEMO=("$PY" benchmarks/throughput.py --device "$DEVICE" --resolution 32 --ch 16 --num-classes 10
      --method s3gan --batch 32 --channels-last yes --warmup "$WARMUP" --steps 20)
part "demo size, eager and compiled" 120 "${DEMO[@]}" --compile both
part "demo size, compiled with CUDA graphs" 120 "${DEMO[@]}" --compile yes \
  --compile-mode reduce-overhead
rm -rf "$WORK"
log "## gpu_check done in $(( $(date +%s) - start ))s"
