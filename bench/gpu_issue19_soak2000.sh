#!/usr/bin/env bash
# Issue 19, session 9, third H200 call: the 2,000-step soak, klein 4B 1024² streamed under a 4 GiB cap (~0.24 s/step:
# about 8.5 minutes), with the streamer's GPU tests run beside it (small kernels; they do not count towards the
# soak's capped process). One tarball back. carry [".comfy", ".whl"].
set -u
source bench/gpu_env.sh
R=/tmp/issue19 && mkdir -p $R
(timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_block_stream.py > $R/gpu_tests.txt 2>&1) &
timeout 560 python3 bench/bench_lowvram.py --models klein4b --modes fp8+low_vram+offload --cap klein4b:4 --steps 2000 \
    --warm 10 --sample-every 100 --tag s9_soak2000 > $R/soak_log.txt 2>&1
wait
cp "$OUT"/bench_lowvram_*.json $R/ 2>/dev/null
tar czf "$OUT/issue19.tgz" -C /tmp issue19 && rm -f "$OUT"/bench_lowvram_*.json
tail -2 $R/gpu_tests.txt
grep -h '^{' $R/soak_log.txt | cut -c1-300
