#!/usr/bin/env bash
# Every pending GPU measurement of the project, in stages that each run under their own time cap.
#
#   bash bench/gpu_session.sh                 # every stage, in the order of bench/gpu_plan.md (value per GPU-second)
#   bash bench/gpu_session.sh model kernels   # just these stages
#   bash bench/gpu_session.sh --dry-run       # on the CPU, in seconds: every step's command line is parsed by its
#                                             # script (`--dry-run`), inputs and output paths checked; nothing runs
#
# A stage is a function `stage_NAME` in bench/gpu_stages/NAME.sh, built from `step CAP -- COMMAND...`. A step
# runs under `timeout -s INT` (Python and pytest stop as on ^C and still write what they have); a stage whose
# code has not landed calls `skip "why"`. Everything a step writes under bench/results/ and every log is copied
# to $WORK and packed into $OUT/gpu_session.tgz after every step (the device tool returns at most 8 files from
# $OUT), with session.jsonl: one line per step (stage, command, exit status, seconds) for bench/gpu_plan.md.
#
# On the device tool: carry `.whl` (PyAV, soundfile, cffi, pycparser wheels for CPython 3.12; see
# /work/.library/device/README.md) and set CALL_S to the call's timeout_s, WAVE_RT_COMMIT to the commit.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
stages=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) stages+=("$a") ;;
  esac
done
ORDER=(tests model features kernels archive export train dali presets fixtures)
[ ${#stages[@]} -eq 0 ] && stages=("${ORDER[@]}")
OUT=${OUT:-$(mktemp -d)}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 OUT WORK DRY
commit=${WAVE_RT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
# results measured on uncommitted code say so (bench/results itself is where they are written)
if [ -z "${WAVE_RT_COMMIT:-}" ] && [ -n "$(git status --porcelain --untracked-files=no -- . ':(top,exclude)bench/results' 2>/dev/null)" ]; then
  commit="$commit+dirty"
fi
export WAVE_RT_COMMIT=$commit
start=$(date +%s)
touch "$WORK/.start"
PY=${PYTHON:-python3}
left() { echo $(( ${CALL_S:-570} - ($(date +%s) - start) )); }
failed=0
nstep=0

pack() {
  find bench/results -maxdepth 1 -name '*.json' -newer "$WORK/.start" -exec cp {} "$WORK/" \; 2>/dev/null
  tar -czf "$OUT/gpu_session.tgz.tmp" -C "$WORK" . && mv "$OUT/gpu_session.tgz.tmp" "$OUT/gpu_session.tgz"
}

record() {  # stage rc seconds command...
  local st=$1 rc=$2 secs=$3; shift 3
  $PY - "$st" "$rc" "$secs" "$DRY" "$*" >>"$WORK/session.jsonl" <<'PYEOF'
import json, sys
st, rc, secs, dry, cmd = sys.argv[1:]
print(json.dumps({"stage": st, "rc": int(rc), "seconds": int(secs), "dry_run": dry == "1", "command": cmd}))
PYEOF
}

# step CAP -- COMMAND...: run COMMAND under CAP seconds (less if the call's time is running out)
step() {
  local cap=$1; shift
  [ "${1:-}" = "--" ] && shift
  nstep=$((nstep + 1))
  local log="$WORK/${STAGE}_${nstep}.log" t0 rc
  t0=$(date +%s)
  if [ "$DRY" = 1 ]; then
    if [ "$1" = "$PY" ] && [ "${2:-}" = "-m" ] && [ "${3:-}" = "pytest" ]; then
      timeout 120 "$@" --collect-only -q >"$log" 2>&1; rc=$?
      [ "$rc" = 5 ] && rc=0  # no GPU test collected is fine on a CPU machine
    else
      timeout 120 "$@" --dry-run >"$log" 2>&1; rc=$?
    fi
    [ "$rc" = 0 ] && echo "  ok    $STAGE: $*" || { echo "  FAIL  $STAGE (rc $rc): $*"; sed 's/^/        /' "$log" | tail -15; }
  else
    local budget=$(( $(left) - 15 ))
    [ "$cap" -gt "$budget" ] && cap=$budget
    if [ "$cap" -lt 20 ]; then
      echo "skip $STAGE: $* (no time left in this call)"; record "$STAGE" 124 0 "$@"; return 0
    fi
    echo "== $STAGE (cap ${cap}s): $*"
    timeout -s INT -k 20 "$cap" "$@" 2>&1 | tee "$log"; rc=${PIPESTATUS[0]}
  fi
  record "$STAGE" "$rc" $(( $(date +%s) - t0 )) "$@"
  [ "$rc" = 0 ] || failed=1
  pack
  return 0
}

skip() { echo "  skip  $STAGE: $*"; echo "{\"stage\": \"$STAGE\", \"skipped\": \"$*\"}" >>"$WORK/session.jsonl"; }

# run a command in the background for the rest of the stage (CPU work while the GPU runs other steps)
background() { if [ "$DRY" = 1 ]; then "$@" --dry-run >/dev/null 2>&1 || { echo "  FAIL  $STAGE (background): $*"; failed=1; }; else "$@" >"$WORK/${STAGE}_bg.log" 2>&1 & fi; }

for f in bench/gpu_stages/*.sh; do
  # shellcheck source=/dev/null
  source "$f"
done

if [ "$DRY" = 0 ]; then
  if [ -d .whl ] && ! $PY -c "import av, soundfile" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  (cd /tmp && $PY -c "import wave_rt.kernels" 2>/dev/null) || $PY -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$WORK/nvidia_smi.txt"
  $PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$WORK/nvidia_smi.txt"
else
  echo "dry run of stages: ${stages[*]}"
fi

for s in "${stages[@]}"; do
  STAGE=$s
  if ! declare -F "stage_$s" >/dev/null; then
    if [[ " ${ORDER[*]} " == *" $s "* ]]; then
      skip "bench/gpu_stages/$s.sh has not landed yet"
    else
      echo "unknown stage $s (known: ${ORDER[*]})" >&2; failed=1
    fi
    continue
  fi
  "stage_$s"
done
pack
echo "gpu_session: stages ${stages[*]} done in $(( $(date +%s) - start )) s; results in $OUT/gpu_session.tgz"
exit $failed
