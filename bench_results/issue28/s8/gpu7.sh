#!/bin/bash
# issue 28, session 8, call 2: where a round goes on the H100 (per hop), graph reuse, and CUDA graphs on / off
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
" > $R/models.log 2>&1 || { step "MODEL FAILED"; tail -20 $R/models.log; exit 1; }
step "model written"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph"
timeout 80 $B --part pipeline --seqs 1,64 --steps 64 --micro-batches 1 --codec f16 --ttft-prompt 64 --deadline 75 --json $R/pipe.json > $R/pipe.log 2>&1
step "pipeline done"
GGML_CUDA_DISABLE_GRAPHS=1 timeout 80 $B --part pipeline --seqs 1,64 --steps 64 --micro-batches 1 --codec f16 --ttft-prompt 64 --deadline 75 --json $R/pipe_nographs.json > $R/pipe_nographs.log 2>&1
step "pipeline, no CUDA graphs, done"
tar czf $OUT/results.tgz -C /tmp r
for f in $R/pipe.log $R/pipe_nographs.log; do echo "== $f"; grep -E "whole engine|round|reuse|hop" $f | head -20; done
