#!/bin/bash
# issue 28, session 9, call 1: WAN link (10 ms, 100 Mbit/s), 64 concurrent: how many micro-batches cover the link
set -o pipefail
T0=$(date +%s); step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/py && tar xzf .dev/carry5/llama_cpp_py.tgz -C /tmp/py && tar xJf .dev/carry5/cudalib.tar.xz -C /tmp
export PYTHONPATH=/tmp/site:/tmp/py:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R
nvidia-smi -L | tee -a $OUT/progress.txt
python3 -c "
import sys; sys.path[:0] = ['tests']
from testmodels import write_random_gguf
write_random_gguf('/tmp/l8b.gguf', 'llama', variant='llama3', qtype='q8_0', n_ctx_train=8192, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
" > $R/models.log 2>&1
step "model written"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph --part gateway --conc 64 --ignore-eos --codec int8 --delay-ms 10 --rate-mbit 100 --ttft-prompt 256"
timeout 170 $B --micro-batches 4,6,8,12 --baseline layer-split-bs --deadline 160 --json $R/wan1.json > $R/wan1.log 2>&1
step "wan 1 done"
timeout 100 $B --micro-batches 8,4 --deadline 95 --json $R/wan2.json > $R/wan2.log 2>&1
step "wan 2 done"
tar czf $OUT/results.tgz -C /tmp r
for f in $R/wan1.log $R/wan2.log; do echo "== $f"; grep -E "concurrent:|micro-batches [0-9]|gateway chose" $f | head -20; done
grep -v "^\[" $R/wan1.log | grep -E "^ +[0-9]|x |tok/s" | head -12
