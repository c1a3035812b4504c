#!/usr/bin/env bash
# Serve the 8B hybrid Mamba model over HTTP, as Megatron-LM's examples/mamba/run_text_gen_server_8b.sh does.
#
#   bash examples/mamba/run_text_gen_server_8b.sh CHECKPOINT_PATH TOKENIZER_PATH
#   python tools/text_generation_cli.py localhost:5000          # an interactive client (another terminal)
#
# CHECKPOINT_PATH: a checkpoint of the 8B recipe (MODEL_SCALE=8B bash examples/mamba/train.sh ...), at any tensor /
# pipeline-parallel layout: it is re-split on load for the serving layout. TOKENIZER_PATH: its SentencePiece .model.
# Environment: TP (default 1: one GPU, bf16 weights take ~16 GB) sets the tensor-parallel size (TP processes),
# PORT (default 5000), HOST (default 127.0.0.1; 0.0.0.0 exposes the unauthenticated server to the network),
# MASTER_PORT (default 6000). Extra arguments after the two paths go to the server (e.g. --draft-load DIR).
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CHECKPOINT_PATH TOKENIZER_PATH [server flags...]" >&2
    exit 2
fi
CHECKPOINT_PATH=$1
TOKENIZER_PATH=$2
shift 2
cd "$(dirname "$0")/../.."
TP=${TP:-1}

export CUDA_DEVICE_MAX_CONNECTIONS=1

exec torchrun --nproc_per_node "$TP" --nnodes 1 --node_rank 0 --master_addr localhost \
    --master_port "${MASTER_PORT:-6000}" tools/run_hybrid_text_generation_server.py \
    --tensor-model-parallel-size "$TP" \
    --pipeline-model-parallel-size 1 \
    --load "$CHECKPOINT_PATH" \
    --untie-embeddings-and-output-weights \
    --num-layers 56 \
    --hidden-size 4096 \
    --num-attention-heads 32 \
    --group-query-attention \
    --num-query-groups 8 \
    --hybrid-attention-ratio 0.08 \
    --hybrid-mlp-ratio 0.5 \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --disable-bias-linear \
    --normalization RMSNorm \
    --seq-length 4096 \
    --max-position-embeddings 4096 \
    --position-embedding-type none \
    --tokenizer-type GPTSentencePieceTokenizer \
    --tokenizer-model "$TOKENIZER_PATH" \
    --distributed-backend nccl \
    --distributed-timeout-minutes 1440 \
    --bf16 \
    --micro-batch-size 1 \
    --seed 42 \
    --host "${HOST:-127.0.0.1}" \
    --port "${PORT:-5000}" \
    "$@"
