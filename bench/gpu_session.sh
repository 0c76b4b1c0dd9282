#!/usr/bin/env bash
# The GPU work of one device-tool session, in stages that each fit one 10-minute call:
#
#   bash bench/gpu_session.sh model     # GPU-marked tests + bench_model --config 7b
#   bash bench/gpu_session.sh kernels   # bench_kernels: layer_fusion_mlp, scalar_mix, similarity_topk
#   bash bench/gpu_session.sh rest      # bench_kernels info_nce (merged) + bench_archive --model-config 7b
#   bash bench/gpu_session.sh finish    # what the first H100 session (2026-11-22) did not reach: 7B video rows of
#                                       # bench_model and bench_archive, info_nce at B=16k (then 64k, 256k)
#   bash bench/gpu_session.sh tests     # pytest -m gpu alone (per-test cap, every outcome listed)
#
# Every step has its own time cap so that a slow one cannot take the rest of the call with it, and what
# a step finished is copied to $OUT (only $OUT comes back from the device machine). Missing pure-Python
# dependencies (PyAV, soundfile) travel as wheels in .whl/ (see /work/.library/device/README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:?stage: model, kernels, rest, finish or tests}
OUT=${OUT:-$(mktemp -d)}  # the device tool sets OUT; elsewhere a scratch folder
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
commit=${WAVE_RT_COMMIT:-unknown}
start=$(date +%s)
left() { echo $(( ${CALL_S:-570} - ($(date +%s) - start) )); }

if [ -d .whl ] && ! python3 -c "import av, soundfile" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
(cd /tmp && python3 -c "import wave_rt.kernels" 2>/dev/null) || python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"

case "$stage" in
  model)
    timeout 330 python3 bench/bench_model.py --config 7b 2>&1 | tee "$OUT/bench_model_7b.log"
    cp bench/results/model_7b_cuda.json "$OUT/" 2>/dev/null
    t=$(( $(left) - 10 ))
    [ "$t" -gt 30 ] && timeout "$t" python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 240 \
      --continue-on-collection-errors --junitxml="$OUT/gpu_tests.xml" \
      tests/kernels tests/model tests/media 2>&1 | tee "$OUT/gpu_tests.log"
    ;;
  kernels)
    timeout $(( $(left) - 10 )) python3 bench/kernels/bench_kernels.py --only layer_fusion_mlp,scalar_mix,similarity_topk \
      --budget-s $(( $(left) - 90 )) --commit "$commit" --out "$OUT/kernels_h100.json" 2>&1 | tee "$OUT/bench_kernels_1.log"
    ;;
  rest)
    merge=()
    [ -f bench/results/kernels_h100.json ] && merge=(--merge bench/results/kernels_h100.json)
    timeout 260 python3 bench/kernels/bench_kernels.py --only info_nce "${merge[@]}" --budget-s 200 \
      --commit "$commit" --out "$OUT/kernels_h100.json" 2>&1 | tee "$OUT/bench_kernels_2.log"
    timeout $(( $(left) - 10 )) python3 bench/bench_archive.py --model-config 7b --repeats 2 2>&1 \
      | tee "$OUT/bench_archive_7b.log"
    cp bench/results/archive_7b_gpu_cuda.json "$OUT/" 2>/dev/null
    ;;
  finish)
    # the clips for the archive rows are made on the CPU cores while the GPU runs the two steps before it
    python3 bench/bench_archive.py --workload gpu --kinds video,av --media-dir /tmp/wave_rt_media --generate-only \
      >"$OUT/media_gen.log" 2>&1 &
    gen=$!
    timeout 170 python3 bench/bench_model.py --config 7b --repeats 1 --modalities video 2>&1 | tee "$OUT/bench_model_7b_video.log"
    cp bench/results/model_7b_cuda_video.json "$OUT/" 2>/dev/null
    # the first session's info_nce case at B=16k printed nothing for 257 s: now every variant prints a line as
    # it ends and Triton prints its autotuning, so a cut-off run still says where the time went
    TRITON_PRINT_AUTOTUNING=1 timeout 160 python3 bench/kernels/bench_kernels.py --only info_nce \
      --info-nce-batches 16384,65536,262144 --no-compile --budget-s 90 \
      --commit "$commit" --out "$OUT/kernels_h100_info_nce.json" 2>&1 | tee "$OUT/bench_kernels_nce.log"
    wait "$gen"
    timeout $(( $(left) - 10 )) python3 bench/bench_archive.py --model-config 7b --repeats 1 --kinds video,av \
      --media-dir /tmp/wave_rt_media 2>&1 | tee "$OUT/bench_archive_7b_video.log"
    cp bench/results/archive_7b_gpu_cuda.json "$OUT/archive_7b_gpu_cuda_video_av.json" 2>/dev/null
    ;;
  tests)
    # SIGINT, not SIGTERM: pytest then stops like on ^C, prints its summary and writes the JUnit XML
    # (the 2026-11-27 run was killed by SIGTERM after 15 passes and left neither)
    timeout -s INT -k 20 $(( $(left) - 30 )) python3 -m pytest -q -m gpu -p no:cacheprovider --timeout 120 -rA \
      --continue-on-collection-errors --junitxml="$OUT/gpu_tests.xml" \
      tests/kernels tests/model tests/media 2>&1 | tee "$OUT/gpu_tests.log"
    ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
echo "stage $stage done in $(( $(date +%s) - start )) s"
