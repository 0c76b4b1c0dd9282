# (d) the archive job end to end per modality at 7B (bench_archive.py). The 30 s 480p clips are made on the
# CPU cores in the background while the kinds that need none (text, audio) run on the GPU.
stage_archive() {
  background $PY bench/bench_archive.py --workload gpu --kinds video,av --media-dir /tmp/wave_rt_media --generate-only
  step 200 -- $PY bench/bench_archive.py --model-config 7b --repeats 1 --min-seconds 0 --kinds text,audio
  [ "$DRY" = 1 ] || wait
  step 300 -- $PY bench/bench_archive.py --model-config 7b --repeats 1 --min-seconds 0 --kinds video,av --media-dir /tmp/wave_rt_media
}
