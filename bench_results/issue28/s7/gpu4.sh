#!/bin/bash
# issue 28, session 7: prebuilt patched CUDA lib (+ tools); LAN ring off/on at one codec (f16) beside llama-server -bs,
# the one-GPU step ratio (two stage processes vs the whole engine), then the WAN ring off/on if time is left
set -o pipefail
T0=$(date +%s); step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/py && tar xzf .dev/carry4/llama_cpp_py.tgz -C /tmp/py && tar xJf .dev/carry4/cudalib.tar.xz -C /tmp
export PYTHONPATH=/tmp/site:/tmp/py:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R
nvidia-smi -L | tee -a $OUT/progress.txt
ls /tmp/cuda | head -20 > $R/lib.txt
step "lib unpacked"
python3 -c "
import sys; sys.path[:0] = ['tests']
from testmodels import write_random_gguf
write_random_gguf('/tmp/l8b.gguf', 'llama', variant='llama3', qtype='q8_0', n_ctx_train=8192, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
" > $R/models.log 2>&1 || { step "MODEL FAILED"; tail -20 $R/models.log; exit 1; }
step "model written"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph"
timeout 100 $B --part gateway --conc 1,64 --ignore-eos --micro-batches A --codec f16 --delay-ms 0.5 --rate-mbit 1000 --ring off,on --baseline layer-split-bs --deadline 95 --json $R/lan.json > $R/lan.log 2>&1
step "lan done"
timeout 90 $B --part pipeline --seqs 1,64 --steps 32 --codec f16 --deadline 85 --json $R/pipe.json > $R/pipe.log 2>&1
step "pipeline done"
LEFT=$(( 440 - ($(date +%s) - T0) ))
if [ $LEFT -gt 40 ]; then
timeout $LEFT $B --part gateway --conc 1,64 --ignore-eos --micro-batches A --codec auto --delay-ms 10 --rate-mbit 100 --ring off,on --deadline $(( LEFT - 5 )) --json $R/wan.json > $R/wan.log 2>&1
step "wan done"
fi
tar czf $OUT/results.tgz -C /tmp r
grep -h -E "concurrent:|chose|ring:|TTFT|FAILED|vs |ratio|step" $R/lan.log $R/pipe.log $R/wan.log 2>/dev/null | head -80
