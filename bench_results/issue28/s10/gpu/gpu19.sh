#!/bin/bash
# issue 28, session 10, call 1: build the patched CUDA engine + tools; the final tree of session 9 (stages measure
# their step costs, speculation sized by them) on the LAN and WAN links beside llama-server -bs; the stages' tables
set -o pipefail
T0=$(date +%s); step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/src && tar xzf .dev/carry6/lcp-slim.tar.gz -C /tmp/src
export PYTHONPATH=/tmp/site:/tmp/src/llama_cpp_python-0.3.36:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R
nvidia-smi -L | tee -a $OUT/progress.txt; python3 --version | tee -a $OUT/progress.txt
python3 -c "
import sys; sys.path[:0] = ['tests']
from testmodels import write_random_gguf
write_random_gguf('/tmp/l8b.gguf', 'llama', variant='llama3', qtype='q8_0', n_ctx_train=8192, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
" > $R/models.log 2>&1 &
MP=$!
if [ -f .dev/carry6/cudalib.tar.xz ]; then tar xJf .dev/carry6/cudalib.tar.xz -C /tmp; step "lib from carry"; PK=; else
python3 kernels/build.py --backend cuda --cuda-arch 90 --with-tools --src /tmp/src/llama_cpp_python-0.3.36 --out /tmp/cuda --build-dir /tmp/cuda-build -j 16 > $R/build.log 2>&1 || { step "BUILD FAILED"; tail -40 $R/build.log; tar czf $OUT/results.tgz -C /tmp r; exit 1; }
step "build: $(grep -E 'configure .* build' $R/build.log)"
( cd /tmp && tar cf - cuda | xz -T8 -6 > /tmp/cuda.tar.xz ) > /dev/null 2>&1 &
PK=$!
fi
wait $MP || { step "MODEL FAILED"; tail -20 $R/models.log; }
step "model written"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph --part gateway --conc 1,64 --ignore-eos --micro-batches A --ttft-prompt 256"
timeout 100 $B --codec f16 --delay-ms 0.5 --rate-mbit 1000 --baseline layer-split-bs --workdir $R/wd_lan --deadline 95 --json $R/lan.json > $R/lan.log 2>&1; step "lan"
LEFT=$(( 540 - ($(date +%s) - T0) ))
if [ $LEFT -gt 60 ]; then timeout $LEFT $B --codec auto --delay-ms 10 --rate-mbit 100 --workdir $R/wd_wan --deadline $(( LEFT - 8 )) --json $R/wan.json > $R/wan.log 2>&1; step "wan"; fi
if [ -n "$PK" ]; then wait $PK; S=$(stat -c %s /tmp/cuda.tar.xz); split -b 15M /tmp/cuda.tar.xz $OUT/cudalib.part-; step "lib packed: $S bytes"; fi
rm -rf $R/wd_lan/*.gguf $R/wd_wan/*.gguf $R/wd_*/*/*.gguf 2>/dev/null
tar czf $OUT/results.tgz -C /tmp r
for n in lan wan; do echo "== $n"; grep -E "concurrent:|chose|speculat|ring:|vs layer" $R/$n.log | head -12; done
grep -rh "step ms by rows" $R/wd_lan $R/wd_wan 2>/dev/null | head -4
