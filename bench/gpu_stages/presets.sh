# The omni embedder presets (issue 17): lco-omni, e5-omni, omni-embed-nemotron (7B-wide Qwen2.5-Omni thinker) and
# alm2vec (MiDashengLM-7B widths), bf16 random weights: encode vs each model's published bs1 path, and the packed
# path vs the padded forward of the same encoder (rows "<preset>/<modality> xN packed").
stage_presets() {
  step 300 -- $PY bench/bench_presets.py --config 7b --repeats 1
}
