#!/usr/bin/env bash
# Issue 19 item 3 (and issue 17 item 8's method): the shipped low-VRAM style graph with real-size random files (text
# encoder, VAE, diffusion model) under a card-size cap, offload_blocks auto: klein 4B within 4 GiB, then 9B within
# 8 GiB, 40 steps, the suite sampled at the base and every 20 steps (20 sampling steps). One tarball back.
# carry [".comfy", ".whl"]; ~6.5 minutes.
set -u
source bench/gpu_env.sh
R=/tmp/graph && mkdir -p $R
G="python3 bench/bench_user_graph.py --res 1024 --offload auto --steps 40 --every 20 --sample-steps 20"
timeout 170 $G --model klein4b --cap-gib 4 --tag i19_4b > $R/graph_4b_log.txt 2>&1
timeout 215 $G --model klein9b --cap-gib 8 --tag i19_9b > $R/graph_9b_log.txt 2>&1
cp "$OUT"/bench_user_graph_*.json $R/ 2>/dev/null
tar czf "$OUT/graph.tgz" -C /tmp graph && rm -f "$OUT"/bench_user_graph_*.json
grep -h '^ROW' $R/*_log.txt | cut -c1-700
tail -4 $R/graph_9b_log.txt | cut -c1-300
