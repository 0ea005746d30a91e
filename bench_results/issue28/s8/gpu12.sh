#!/bin/bash
# issue 28, session 8, call 7: the LAN link with the relay before / after its learned lead, same machine, beside
# llama-server -bs; the relay's own accuracy on this host
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
" > $R/models.log 2>&1 &
MP=$!
cp molink_lite/tools/link.py /tmp/link_new.py
acc() {  # $1: tag
  python3 .dev/carry5/ws.py s & ES=$!
  python3 -m molink_lite.cli link --listen 127.0.0.1:8766 --to 127.0.0.1:8765 --delay-ms 0.5 > $R/relay_$1.log 2>&1 & RL=$!
  for i in $(seq 1 40); do (echo > /dev/tcp/127.0.0.1/8766) 2>/dev/null && break; sleep 0.25; done
  for p in 8765 8766 8765 8766; do echo -n "$1 port $p: "; P=$p python3 .dev/carry5/ws.py c 2>&1 | tail -1; done | tee -a $R/relay_accuracy.txt
  kill $ES $RL; wait $ES $RL 2>/dev/null
}
B="python3 tests/bench/gpu_pipeline.py --lib /tmp/cuda --model /tmp/l8b.gguf --gpus 0 --stages 2 --stage-output graph --part gateway --conc 1,64 --ignore-eos --micro-batches A --codec f16 --delay-ms 0.5 --rate-mbit 1000 --ttft-prompt 256"
cp .dev/carry5/link_old.py molink_lite/tools/link.py; acc old
cp /tmp/link_new.py molink_lite/tools/link.py; acc new
wait $MP; step "model written"
cp .dev/carry5/link_old.py molink_lite/tools/link.py
timeout 90 $B --baseline layer-split-bs --deadline 85 --json $R/lan_old.json > $R/lan_old.log 2>&1
step "lan, relay before, done"
cp /tmp/link_new.py molink_lite/tools/link.py
timeout 60 $B --deadline 55 --json $R/lan_new.json > $R/lan_new.log 2>&1
step "lan, relay after, done"
cp .dev/carry5/link_old.py molink_lite/tools/link.py
timeout 60 $B --deadline 55 --json $R/lan_old2.json > $R/lan_old2.log 2>&1
cp /tmp/link_new.py molink_lite/tools/link.py
step "lan, relay before (again), done"
tar czf $OUT/results.tgz -C /tmp r
cat $R/relay_accuracy.txt
for f in $R/lan_old.log $R/lan_new.log $R/lan_old2.log; do echo "== $f"; grep -E "concurrent:" $f | head -4; done
grep -v "^\[" $R/lan_old.log | grep -E "^ +[0-9]|x " | head -6
