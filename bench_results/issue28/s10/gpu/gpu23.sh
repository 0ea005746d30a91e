#!/bin/bash
# issue 28, session 10, call 4: the ring in the engine chain (the last stage sends each round on to the first stage
# without the gateway): step ratio at 1 and 64 sequences, ring off/on, without and with CUDA MPS (no build: the
# CUDA library of call 1, stripped, and the dependencies unpacked)
set -o pipefail
T0=$(date +%s); step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
tar xJf .dev/carry7/site.tar.xz -C /tmp && tar xJf .dev/carry7/cudamin.tar.xz -C /tmp
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=/tmp/r4; mkdir -p $R
nvidia-smi -L | tee -a $OUT/progress.txt; step "unpacked"
python3 -c "
import sys; sys.path[:0] = ['tests']
from testmodels import write_random_gguf
write_random_gguf('/tmp/l8b.gguf', 'llama', variant='llama3', qtype='q8_0', n_ctx_train=8192, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
" > $R/models.log 2>&1 || { step "MODEL FAILED"; tail -20 $R/models.log; exit 1; }
step "model written"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph"
P="--part pipeline --seqs 1,64 --steps 48 --micro-batches 1,2 --codec f16 --ttft-prompt 512 --ring off,on"
timeout 80 $B $P --deadline 75 --json $R/pipe_nomps.json > $R/pipe_nomps.log 2>&1; step "pipeline, no MPS"
cp $R/pipe_nomps.log $R/pipe_nomps.json $OUT/ 2>/dev/null
grep -v "^\[" $R/pipe_nomps.log | grep -E "^(whole|2x)" | head -10
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d; step "mps on"
timeout 80 $B $P --deadline 75 --json $R/pipe_mps.json > $R/pipe_mps.log 2>&1; step "pipeline, MPS"
echo quit | nvidia-cuda-mps-control; step "mps off"
tar czf $OUT/results4.tgz -C /tmp r4
for f in $R/pipe_*.log; do echo "== $f"; grep -v "^\[" $f | grep -E "^(whole|2x)" | head -10; grep -E "ring rounds|Error|error" $f | head -10 | cut -c1-170; done
