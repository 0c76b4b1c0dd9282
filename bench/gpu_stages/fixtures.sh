# Golden outputs of torchaudio-based references (the real dasheng package with its torchaudio front end; BEATs'
# torchaudio Kaldi fbank at 128 bins), for environments that have a torch + torchaudio pair (the GPU image: 2.11).
# The committed fixtures under tests/model/fixtures and tests/media/fixtures were made on a CPU in a fresh venv
# with torch 2.11.0 + torchaudio 2.11.0 from PyPI; this stage regenerates them where that pair is already installed.
# Carry the dasheng 0.0.9 and einops wheels in .whl/ (installed with --no-deps). Outputs land in the session tarball.
stage_fixtures() {
  step 120 -- $PY bench/make_dasheng_fixtures.py --out "$WORK/dasheng_fixtures"
  step 60 -- $PY bench/make_fbank_fixtures.py --out "$WORK/fbank_fixtures"
}
