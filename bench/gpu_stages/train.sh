# (e) training: one 7B LoRA (r=128, q/k/v) + fusion-head step of the WAVE recipe on random weights, contrastive
# batches of 1k and 4k 32-token texts: GradCache (chunks of 64) + info_nce against the whole batch in one graph
# with the full-matrix cross-entropy (an out-of-memory baseline is recorded as such). bench/bench_train.py.
stage_train() {
  step 420 -- $PY bench/bench_train.py --config 7b --batches 1024,4096 --chunk 64 --repeats 1
}
