# (b) the 7B model-stage rows (bench_model.py): captions, 10 s audio, 30 s 480p video, 30 s AV. Every row runs
# the packed path (varlen, no padding) and the previous padded path in the same run, plus the bs=1 reference;
# MFU against an 8192^3 bf16 GEMM measured in the same run and the 989 TFLOP/s datasheet figure.
stage_model() {
  step 240 -- $PY bench/bench_model.py --config 7b --repeats 2 --modalities text,audio
  step 330 -- $PY bench/bench_model.py --config 7b --repeats 1 --modalities video,av
}
