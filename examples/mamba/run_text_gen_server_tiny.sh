#!/usr/bin/env bash
# Serve the tiny CPU model that `bash examples/mamba/train.sh` trains (checkpoints/tiny) over HTTP.
#
#   bash examples/mamba/run_text_gen_server_tiny.sh [CHECKPOINT_DIR] [server flags...]
#   python tools/text_generation_cli.py localhost:5000          # an interactive client (another terminal)
#   curl -X PUT localhost:5000/api -H 'Content-Type: application/json' \
#        -d '{"prompts": ["Return the"], "tokens_to_generate": 32, "top_k": 1}'
#
# The architecture comes from the checkpoint (--use-checkpoint-args); the tokenizer is the tiny corpus's BPE.
# Environment: PORT (default 5000), HOST (default 127.0.0.1), TP (default 1; TP=2 runs two CPU processes under
# torchrun with gloo, the checkpoint is re-split on load), DATA_DIR (default data_cache/tiny_corpus).
set -euo pipefail
cd "$(dirname "$0")/../.."
CHECKPOINT_DIR=${1:-checkpoints/tiny}
[ $# -gt 0 ] && shift
DATA_DIR=${DATA_DIR:-data_cache/tiny_corpus}
TP=${TP:-1}
if [ ! -f "$CHECKPOINT_DIR/latest_checkpointed_iteration.txt" ]; then
    echo "error: no checkpoint in $CHECKPOINT_DIR; train one first: bash examples/mamba/train.sh" >&2
    exit 2
fi
FLAGS=(--load "$CHECKPOINT_DIR" --use-checkpoint-args
       --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$DATA_DIR/tokenizer"
       --tensor-model-parallel-size "$TP" --distributed-backend gloo
       --host "${HOST:-127.0.0.1}" --port "${PORT:-5000}")
if [ "$TP" = 1 ]; then
    exec python3 tools/run_hybrid_text_generation_server.py "${FLAGS[@]}" "$@"
fi
exec torchrun --nproc_per_node "$TP" --master_port "${MASTER_PORT:-29518}" tools/run_hybrid_text_generation_server.py \
    "${FLAGS[@]}" "$@"
