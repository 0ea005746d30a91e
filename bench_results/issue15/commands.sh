# The daemon script of run 3 (setup, build, model writing are the same in runs 1 and 2); the benchmark lines of
# runs 1 and 2 follow it as comments.
#!/bin/bash
set -o pipefail
R=/tmp/r15; T0=$(date +%s)
export PYTHONPATH=/tmp/site:/tmp/src/llama_cpp_python-0.3.36:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
step() { echo "[$(( $(date +%s) - T0 )) s] $*" >> $R/progress.txt; }
{ nvidia-smi; nproc; free -g; df -h /tmp; python3 --version; } > $R/env.txt 2>&1
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda"
step "start: models written while the libraries build"
python3 -c "
import sys; sys.path[:0] = ['tests']
from testmodels import write_random_gguf
write_random_gguf('/tmp/l8b.gguf', 'llama', variant='llama3', qtype='q8_0', n_ctx_train=8192, n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
write_random_gguf('/tmp/l32b.gguf', 'llama', variant='llama3', qtype='q4_k', n_ctx_train=8192, n_layer=64, n_embd=5120, n_head=40, n_head_kv=8, n_ff=27648, n_vocab=152064)
" > $R/models.log 2>&1 &
MP=$!
python3 kernels/build.py --backend cuda --cuda-arch 90 --with-tools --src /tmp/src/llama_cpp_python-0.3.36 \
   --out /tmp/cuda --build-dir /tmp/cuda-build -j 32 > $R/build.log 2>&1 || { step "BUILD FAILED"; tail -30 $R/build.log >> $R/progress.txt; touch $R/DONE; exit 1; }
step "build done: $(tail -4 $R/build.log | head -1)"
wait $MP; step "models: $(cat $R/models.log | tail -2) $(ls -la /tmp/*.gguf)"
run() { name=$1; shift; step "run $name"; ln -sf $R/$name.log $R/current.log
        timeout ${LIM:-600} "$@" --json $R/$name.json > $R/$name.log 2>&1; step "  $name rc $?"; }
# run 3: lanes (several llama.cpp contexts per stage) against one lane, same machine
LIM=150 run g8b   $B --part gateway --model /tmp/l8b.gguf --gpus 0,1 --stages 1,2 --lanes 1,2 --micro-batches S,2S \
   --conc 64,128 --baseline layer-split-bs --profile $R/prof8b --gpu-util $R/util8b.csv --deadline 130
LIM=150 run g32b  $B --part gateway --model /tmp/l32b.gguf --shape 32b --qtype q4_k --gpus 0,1 --stages 2 --lanes 1,2 \
   --micro-batches S --conc 64,128 --ttft-prompt 512 --gpu-util $R/util32b.csv --deadline 110
step "all done"; touch $R/DONE

# ---- run 1 (device sampling on in the stages: the default then)
# LIM=240 run p8b   $B --part pipeline --model /tmp/l8b.gguf --gpus 0 --stages 1,2 --micro-batches 1 --seqs 1,64 --chain 2
# LIM=150 run p8b_off $B --part pipeline --model /tmp/l8b.gguf --gpus 0 --stages 2 --micro-batches 1 --seqs 1,64 --device-sampling off
# # 8B: two GPUs behind the gateway vs llama.cpp (layer split, its backend sampling, RPC)
# LIM=420 run g8b   $B --part gateway --model /tmp/l8b.gguf --gpus 0,1 --stages 1,2 --micro-batches S --conc 64,128 \
#    --baseline layer-split,layer-split-bs,rpc --profile $R/prof8b --gpu-util $R/util8b.csv
# LIM=150 run p32b  $B --part pipeline --model /tmp/l32b.gguf --shape 32b --qtype q4_k --gpus 0 --stages "" --seqs 1,64
# LIM=480 run g32b  $B --part gateway --model /tmp/l32b.gguf --shape 32b --qtype q4_k --gpus 0,1 --stages 1,2 \
#    --micro-batches S --conc 64,128 --baseline layer-split,layer-split-bs,rpc --gpu-util $R/util32b.csv
# ---- run 2 (device sampling off, pipelined prefill)
# LIM=200 run p8b   $B --part pipeline --model /tmp/l8b.gguf --gpus 0 --stages 1,2 --micro-batches 1 --seqs 1,64 --chain 2
# LIM=420 run g8b   $B --part gateway --model /tmp/l8b.gguf --gpus 0,1 --stages 1,2 --micro-batches S,S+1,S+2 --conc 64,128 \
#    --baseline layer-split,layer-split-bs --profile $R/prof8b --gpu-util $R/util8b.csv
# LIM=120 run p32b  $B --part pipeline --model /tmp/l32b.gguf --shape 32b --qtype q4_k --gpus 0 --stages "" --seqs 1,64
# LIM=480 run g32b  $B --part gateway --model /tmp/l32b.gguf --shape 32b --qtype q4_k --gpus 0,1 --stages 1,2 \
#    --micro-batches S,S+1 --conc 64,128 --baseline layer-split,layer-split-bs --gpu-util $R/util32b.csv
