#!/bin/bash
# issue 28, session 8, call 3: py-spy (native frames) on the stage processes and the driver, one sequence and 64
set -o pipefail
T0=$(date +%s); step() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/progress.txt; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > /dev/null 2>&1
mkdir -p /tmp/py && tar xzf .dev/carry5/llama_cpp_py.tgz -C /tmp/py && tar xJf .dev/carry5/cudalib.tar.xz -C /tmp
export PYTHONPATH=/tmp/site:/tmp/py:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
R=/tmp/r; mkdir -p $R/prof
nvidia-smi -L | tee -a $OUT/progress.txt
python3 -c "
import sys; sys.path[:0] = ['tests']
from testmodels import write_random_gguf
write_random_gguf('/tmp/l8b.gguf', 'llama', variant='llama3', qtype='q8_0', n_ctx_train=8192, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
" > $R/models.log 2>&1 || { step "MODEL FAILED"; tail -20 $R/models.log; exit 1; }
step "model written"
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph --part pipeline --micro-batches 1 --codec f16 --skip-whole-engine --ttft-prompt 16"
spy() {  # $1: tag; profiles every stage process and the driver for 6 s
  for i in $(seq 1 120); do [ $(pgrep -f "cli stage" | wc -l) -ge 2 ] && break; sleep 0.5; done
  sleep 9
  n=0; SP=""; for p in $(pgrep -f "cli stage") $BP; do
    py-spy record --native --pid $p --rate 250 --duration 6 --format raw -o $R/prof/$1-$n-$p.txt > $R/prof/$1-$n.log 2>&1 &
    SP="$SP $!"; n=$((n+1)); done; wait $SP
  pgrep -af "cli stage" > $R/prof/$1-pids.txt
}
$B --seqs 1 --steps 3000 --deadline 60 --json $R/p1.json > $R/p1.log 2>&1 & BP=$!
spy s1; wait $BP 2>/dev/null; step "seqs 1 done"
$B --seqs 64 --steps 400 --deadline 60 --json $R/p64.json > $R/p64.log 2>&1 & BP=$!
spy s64; wait $BP 2>/dev/null; step "seqs 64 done"
tar czf $OUT/results.tgz -C /tmp r
grep -hE "round|reuse" $R/p1.log $R/p64.log; ls -la $R/prof
