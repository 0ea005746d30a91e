#!/bin/bash
# issue 28, session 6: build the patched CUDA engine + tools; ring off/on over LAN and WAN links beside llama.cpp
set -o pipefail
T0=$(date +%s); step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/src && tar xzf .dev/carry/lcp-slim.tar.gz -C /tmp/src
export PYTHONPATH=/tmp/site:/tmp/src/llama_cpp_python-0.3.36:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R
nvidia-smi -L | tee -a $OUT/progress.txt
python3 -c "
import sys; sys.path[:0] = ['tests']
from testmodels import write_random_gguf
write_random_gguf('/tmp/l8b.gguf', 'llama', variant='llama3', qtype='q8_0', n_ctx_train=8192, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
" > $R/models.log 2>&1 &
MP=$!
if [ -f .dev/carry/cudalib.tar.xz ]; then tar xJf .dev/carry/cudalib.tar.xz -C /tmp; step "lib from carry"; else
python3 kernels/build.py --backend cuda --cuda-arch 90 --with-tools --src /tmp/src/llama_cpp_python-0.3.36 --out /tmp/cuda --build-dir /tmp/cuda-build -j 16 > $R/build.log 2>&1 || { step "BUILD FAILED"; tail -30 $R/build.log; exit 1; }
step "build: $(grep -E 'configure .* build' $R/build.log)"
( cd /tmp && tar cf - cuda | xz -T16 -6 > /tmp/cuda.tar.xz ) > /dev/null 2>&1 &
PK=$!
fi
wait $MP; step "model written"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --part gateway --gpus 0 --stages 2 --conc 1,64 --ignore-eos --micro-batches A --codec auto --stage-output graph"
step "lan: ring off/on + llama-server -bs"
timeout 170 $B --delay-ms 0.5 --rate-mbit 1000 --ring off,on --baseline layer-split-bs --deadline 160 --json $R/lan.json > $R/lan.log 2>&1
step "wan: ring off/on + rpc + llama-server -bs"
LEFT=$(( 560 - ($(date +%s) - T0) ))
timeout $LEFT $B --delay-ms 10 --rate-mbit 100 --ring off,on --baseline rpc --deadline $(( LEFT - 15 )) --json $R/wan.json > $R/wan.log 2>&1
step "done"
if [ -n "$PK" ]; then wait $PK; S=$(stat -c %s /tmp/cuda.tar.xz); if [ "$S" -lt 47000000 ]; then split -b 15M /tmp/cuda.tar.xz $OUT/cudalib.part-; step "lib packed: $S bytes"; else step "lib too big: $S"; fi; fi
tar czf $OUT/results.tgz -C /tmp r
grep -h -E "concurrent:|chose|ring:|TTFT|FAILED|vs layer-split-bs|round|ratio" $R/lan.log $R/wan.log | head -80
