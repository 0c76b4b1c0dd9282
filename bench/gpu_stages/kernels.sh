# (c) kernels: similarity_topk (q=1024, N=10M, D=3584, k=100) and info_nce at B = 16k, 64k, 256k.
stage_kernels() {
  step 200 -- $PY bench/kernels/bench_kernels.py --only info_nce --no-compile --budget-s 150 \
    --commit "$commit" --out "$WORK/kernels_info_nce.json"
  step 240 -- $PY bench/kernels/bench_kernels.py --only similarity_topk --budget-s 180 \
    --commit "$commit" --out "$WORK/kernels_similarity_topk.json"
}
