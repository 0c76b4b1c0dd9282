# (g) DALI GPU decoding (issue 16): DALI NVDEC H.264 decode (+ GPU features) against PyAV decode + CPU features
# on 1..all cores, H.264 + AAC clips (AAC has no DALI decoder: backend='auto' sends it to PyAV).
# DALI's wheel (199 MB) reaches the machine in parts over several device calls: bench/dali_wheel.py says how;
# the parts must be in /tmp/dali-parts when this stage runs.
stage_dali() {
  step 120 -- $PY bench/dali_wheel.py install --parts /tmp/dali-parts --target /tmp/site
  step 360 -- $PY bench/bench_media.py --decode --clips 32 --seconds 10 --size 854x480 --repeats 3 \
    --out "$WORK/media_gpu_decode.json"
}
