#!/bin/bash
# issue 28, session 7, call 3: the gateway on a host of its own (a relay in front of the first stage too):
# ring off / on / auto over a LAN-like and a WAN-like link, prebuilt patched CUDA lib
set -o pipefail
T0=$(date +%s); step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/py && tar xzf .dev/carry4/llama_cpp_py.tgz -C /tmp/py && tar xJf .dev/carry4/cudalib.tar.xz -C /tmp
export PYTHONPATH=/tmp/site:/tmp/py:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R
nvidia-smi -L | tee -a $OUT/progress.txt
python3 -c "
import sys; sys.path[:0] = ['tests']
from testmodels import write_random_gguf
write_random_gguf('/tmp/l8b.gguf', 'llama', variant='llama3', qtype='q8_0', n_ctx_train=8192, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
" > $R/models.log 2>&1 || { step "MODEL FAILED"; tail -20 $R/models.log; exit 1; }
step "model written"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph --part gateway --conc 1,64 --ignore-eos --micro-batches A --ttft-prompt 256"
timeout 75 $B --codec f16 --delay-ms 0.5 --rate-mbit 1000 --gateway-delay-ms 0.5 --ring off,on,auto --deadline 70 --json $R/lan_gw.json > $R/lan_gw.log 2>&1
step "lan done"
timeout 70 $B --codec auto --delay-ms 10 --rate-mbit 100 --gateway-delay-ms 10 --ring off,on --deadline 65 --json $R/wan_gw.json > $R/wan_gw.log 2>&1
step "wan done"
tar czf $OUT/results.tgz -C /tmp r
grep -h -E "concurrent:|chose|ring:|TTFT|FAILED|vs " $R/lan_gw.log $R/wan_gw.log 2>/dev/null | head -60
