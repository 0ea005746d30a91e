#!/bin/bash
# issue 28, session 8, call 5: the engine with kernels/patches 0001 + 0002 (kv-pad) built here; stock llama-server
# built from the same patched source (both patches are opt-in: a no-op for it) as the baseline; the one-GPU step ratio and the LAN link
set -o pipefail
T0=$(date +%s); step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/src /tmp/py && tar xzf .dev/carry5/lcp-slim.tar.gz -C /tmp/src && tar xzf .dev/carry5/llama_cpp_py.tgz -C /tmp/py
export PYTHONPATH=/tmp/site:/tmp/py:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R
nvidia-smi -L | tee -a $OUT/progress.txt
python3 -c "
import sys; sys.path[:0] = ['tests']
from testmodels import write_random_gguf
write_random_gguf('/tmp/l8b.gguf', 'llama', variant='llama3', qtype='q8_0', n_ctx_train=8192, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
" > $R/models.log 2>&1 &
MP=$!
python3 kernels/build.py --backend cuda --cuda-arch 90 --with-tools --src /tmp/src/llama_cpp_python-0.3.36 --out /tmp/cuda --build-dir /tmp/cuda-build -j 16 > $R/build.log 2>&1 || { step "BUILD FAILED"; tail -30 $R/build.log; exit 1; }
step "build: $(grep -E 'configure .* build' $R/build.log) $(grep -o '"patches": \[[^]]*\]' /tmp/cuda/build_info.json)"
wait $MP; step "model written"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph"
timeout 60 $B --part pipeline --seqs 1,64 --steps 64 --micro-batches 1 --codec f16 --ttft-prompt 512 --deadline 55 --json $R/pipe.json > $R/pipe.log 2>&1
step "pipeline done"
timeout 100 $B --part gateway --conc 1,64 --ignore-eos --micro-batches A --codec f16 --delay-ms 0.5 --rate-mbit 1000 --baseline layer-split-bs --ttft-prompt 512 --deadline 95 --json $R/lan.json > $R/lan.log 2>&1
step "lan done"
( cd /tmp && tar cf - cuda | xz -T16 -6 > /tmp/cuda.tar.xz ) > /dev/null 2>&1 &
PK=$!
LEFT=$(( 540 - ($(date +%s) - T0) ))
if [ $LEFT -gt 45 ]; then
timeout $LEFT $B --part gateway --conc 1,64 --ignore-eos --micro-batches A --codec auto --delay-ms 10 --rate-mbit 100 --ttft-prompt 256 --deadline $(( LEFT - 5 )) --json $R/wan.json > $R/wan.log 2>&1
step "wan done"
fi
tar czf $OUT/results.tgz -C /tmp r
wait $PK; S=$(stat -c %s /tmp/cuda.tar.xz); if [ "$S" -lt 47000000 ]; then split -b 15M /tmp/cuda.tar.xz $OUT/cudalib.part-; step "lib packed: $S bytes"; else step "lib too big: $S"; fi
grep -E "whole engine|round|reuse" $R/pipe.log | head -12
for f in $R/lan.log $R/wan.log; do echo "== $f"; grep -v "^\[" $f | grep -E "^ +[0-9]|TTFT|concurrent|x " | head -12; grep -E "chose|ring:" $f | head -3; done
