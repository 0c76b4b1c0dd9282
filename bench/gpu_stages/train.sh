# (e) training: one 7B LoRA (r=128, q/k/v) + fusion-head step of the WAVE recipe on random weights, contrastive
# batches of 1k and 4k 32-token texts: GradCache (chunks of 64) + info_nce against the whole batch in one graph
# with the full-matrix cross-entropy (an out-of-memory baseline is recorded as such). bench/bench_train.py.
# The 7B LoRA step runs unsharded: on one GPU FSDP2 (`distributed = "fsdp2"`) shards over a mesh of one rank,
# i.e. shards nothing and only adds its hooks; the bf16 7B weights (15 GB) fit. What FSDP2 needs a GPU for
# (NCCL, units moved to the GPU as they are sharded, MixedPrecisionPolicy on CUDA, checkpoint/resume/final
# save) is the GPU-marked test below, on the tiny model, ahead of the long step.
stage_train() {
  step 150 -- $PY -m pytest -q -m gpu -p no:cacheprovider --timeout 140 -rA tests/train/test_fsdp2.py
  step 420 -- $PY bench/bench_train.py --config 7b --batches 64,1024,4096 --chunk 64 --repeats 1
}
