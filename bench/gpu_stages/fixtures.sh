# Golden Dasheng outputs with the real torchaudio front end (the GPU image has torch + torchaudio 2.11; the CPU test
# machines have no torchaudio build). Carry the dasheng 0.0.9 and einops wheels in .whl/ (installed with --no-deps).
# The output lands in the session tarball; copy dasheng_golden.{safetensors,json} to tests/model/fixtures/.
stage_fixtures() {
  step 120 -- $PY bench/make_dasheng_fixtures.py --out "$WORK/dasheng_fixtures"
}
