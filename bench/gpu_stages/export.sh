# (issue 13) export backends on the 7B config, batch-1 latency of text and 10 s audio (+ batch-8 throughput):
# eager vs torch.compile, vs AOTInductor, vs ONNX Runtime CUDA. One step per compiled backend, each with its own
# eager baseline measured in the same process; each writes bench/results/export_latency_7b_cuda_<backend>.json.
stage_export() {
  step 300 -- $PY bench/bench_export.py --config 7b --backends eager,compile --iters 20 --warmup 3
  step 360 -- $PY bench/bench_export.py --config 7b --backends eager,aoti --iters 20 --warmup 3
  # onnxruntime-gpu is not on the GPU image: use a wheel carried in .whl/ (gpu_session.sh installs .whl/*.whl
  # into /tmp/site), else skip the ONNX Runtime CUDA row with the reason.
  if [ "$DRY" = 1 ] || $PY -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
    step 240 -- $PY bench/bench_export.py --config 7b --backends eager,onnxruntime --iters 20 --warmup 3
  else
    skip "ONNX Runtime CUDA: onnxruntime-gpu is not installed (carry its wheel in .whl/: pip download onnxruntime-gpu)"
  fi
}
