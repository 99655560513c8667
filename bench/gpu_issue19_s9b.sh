#!/usr/bin/env bash
# Issue 19, session 9, second H200 call: fixed copy buffers + the plan from measured widths and the allocator's
# reserve. GPU tests; klein 9B resident vs streamed under 8 GiB; klein 4B resident (10 steps) and streamed under
# 4 GiB for 500 steps (the soak). One tarball back. carry [".comfy", ".whl"]; ~8.5 minutes.
set -u
source bench/gpu_env.sh
R=/tmp/issue19 && mkdir -p $R
B="python3 bench/bench_lowvram.py"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_block_stream.py > $R/gpu_tests.txt 2>&1
tail -2 $R/gpu_tests.txt
timeout 200 $B --models klein9b --modes fp8+low_vram,fp8+low_vram+offload --cap klein9b:8 --steps 10 --warm 4 \
    --tag s9_9b > $R/9b_log.txt 2>&1
timeout 80 $B --models klein4b --modes fp8+low_vram --steps 10 --warm 4 --tag s9_4b_resident > $R/4b_log.txt 2>&1
timeout 220 $B --models klein4b --modes fp8+low_vram+offload --cap klein4b:4 --steps 500 --warm 10 --sample-every 25 \
    --tag s9_soak500 > $R/soak_log.txt 2>&1
cp "$OUT"/bench_lowvram_*.json $R/ 2>/dev/null
tar czf "$OUT/issue19.tgz" -C /tmp issue19 && rm -f "$OUT"/bench_lowvram_*.json
grep -h "Klein LoRA: .* blocks stream" $R/*_log.txt
grep -h '^{' $R/*_log.txt | cut -c1-400
