# (b) the 7B model-stage rows (bench_model.py): text, 10 s audio, 30 s video.
stage_model() {
  step 330 -- $PY bench/bench_model.py --config 7b --repeats 1
}
