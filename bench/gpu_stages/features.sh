# (b2) the 7B model stage with deferred features computed in batch on the GPU vs features precomputed per item on
# the CPU (bench_features.py): 64 x 10 s audio and 8 x 30 s 480p video; parity of features and embeddings. Its own
# stage so that `model` fits one call.
stage_features() {
  step 300 -- $PY bench/bench_features.py --config 7b --repeats 2
}
