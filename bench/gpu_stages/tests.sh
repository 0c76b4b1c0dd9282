# (a) the GPU-marked tests: per-test cap; SIGINT at the stage cap keeps pytest's summary and JUnit XML.
# Last run (H200, 2026-11-27): 15 passed in 320 s, the rest cut off (torch.compile / autotune dominate).
stage_tests() {
  step 330 -- $PY -m pytest -q -m gpu -p no:cacheprovider --timeout 120 -rA --continue-on-collection-errors \
    --junitxml="$WORK/gpu_tests.xml" tests
}
