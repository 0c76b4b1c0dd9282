# (c) kernels (issues 3, 14): info_nce at B = 16k, 64k, 256k; similarity_topk at q=1024, N=10M, D=3584, k=100
# against the chunked cuBLAS + torch.topk loop, plus the q=16 and q=1 bandwidth rows on the same corpus; the
# search step of `wave-rt search` (flat-gpu vs faiss-cpu flat) on 1M x 3584. Expected ~6 min, caps 9.5 min.
stage_kernels() {
  step 180 -- $PY bench/kernels/bench_kernels.py --only info_nce --no-compile --budget-s 140 \
    --info-nce-batches 16384,65536,262144 --commit "$commit" --out "$WORK/kernels_info_nce.json"
  step 240 -- $PY bench/kernels/bench_kernels.py --only similarity_topk --no-compile --budget-s 200 \
    --topk-q 1024,16,1 --commit "$commit" --out "$WORK/kernels_similarity_topk.json"
  step 150 -- $PY bench/bench_search.py --queries 1,16 --commit "$commit" --out "$WORK/search_latency.json"
}
