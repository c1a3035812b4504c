#!/usr/bin/env bash
# Pretrain a hybrid Mamba model, as Megatron-LM's examples/mamba/train.sh does.
#
#   bash examples/mamba/train.sh                                   # tiny: CPU, no arguments, under a minute
#   NPROC=4 TP=2 PP=2 bash examples/mamba/train.sh                  # tiny, 4 CPU processes: TP2 x PP2 (gloo)
#   bash examples/mamba/train.sh CHECKPOINT_DIR TENSORBOARD_DIR DATA_PREFIX TOKENIZER_MODEL   # 800M / 8B
#
# MODEL_SCALE=tiny|800M|8B (default tiny). The tiny scale prepares its own corpus (Python's standard-library
# docstrings), trains a 4-layer hybrid for 200 iterations on CPU, evaluates, and saves a checkpoint in ./checkpoints/tiny.
# Parallel layout: NPROC processes on this node (torchrun), TP tensor-parallel, PP pipeline-parallel ranks, the rest
# data parallel; SP=1 adds sequence parallelism. Multi-node: examples/mamba/train.slurm.
set -euo pipefail
cd "$(dirname "$0")/../.."
MODEL_SCALE=${MODEL_SCALE:-tiny}
NPROC=${NPROC:-$([ "$MODEL_SCALE" = tiny ] && echo 1 || echo 8)}
PP=${PP:-1}
PARALLEL_FLAGS="--pipeline-model-parallel-size $PP"
[ "${SP:-0}" = 1 ] && PARALLEL_FLAGS="$PARALLEL_FLAGS --sequence-parallel"

if [ "$MODEL_SCALE" = tiny ]; then
    DATA_DIR=${DATA_DIR:-data_cache/tiny_corpus}
    CHECKPOINT_DIR=${1:-checkpoints/tiny}
    [ -f "$DATA_DIR/corpus_text_document.idx" ] || python3 examples/mamba/prepare_tiny_corpus.py "$DATA_DIR"
    exec torchrun --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-29517}" pretrain_hybrid.py \
        --tensor-model-parallel-size "${TP:-1}" $PARALLEL_FLAGS \
        --num-layers 4 --hybrid-attention-ratio 0.25 --hybrid-mlp-ratio 0.25 \
        --hidden-size 128 --num-attention-heads 4 --group-query-attention --num-query-groups 2 \
        --mamba-head-dim 32 --mamba-num-groups 2 --mamba-state-dim 32 \
        --seq-length 128 --max-position-embeddings 128 --position-embedding-type none \
        --normalization RMSNorm --disable-bias-linear --untie-embeddings-and-output-weights \
        --attention-dropout 0.0 --hidden-dropout 0.0 --init-method-std 0.02 \
        --micro-batch-size 8 --global-batch-size 16 --train-iters 200 \
        --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.1 --clip-grad 1.0 \
        --adam-beta1 0.9 --adam-beta2 0.95 --seed 1234 \
        --data-path "$DATA_DIR/corpus_text_document" --split 95,5,0 --data-cache-path "$DATA_DIR/index_cache" \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$DATA_DIR/tokenizer" \
        --log-interval 10 --eval-interval 50 --eval-iters 4 --save "$CHECKPOINT_DIR" --save-interval 100 \
        --num-workers 0 --distributed-backend gloo
fi

if [ $# -ne 4 ]; then
    echo "usage: MODEL_SCALE=800M|8B $0 CHECKPOINT_DIR TENSORBOARD_DIR DATA_PREFIX TOKENIZER_MODEL" >&2
    exit 2
fi
CHECKPOINT_DIR=$1 TENSORBOARD_DIR=$2 DATA_PATH=$3 TOKENIZER_PATH=$4
case "$MODEL_SCALE" in
    800M) TP=${TP:-1}; NUM_LAYERS=48; HIDDEN=1024; HEADS=16; GBS=32 ;;
    8B) TP=${TP:-4}; NUM_LAYERS=56; HIDDEN=4096; HEADS=32; GBS=8 ;;
    *) echo "MODEL_SCALE must be tiny, 800M or 8B, got $MODEL_SCALE" >&2; exit 2 ;;
esac
# shellcheck disable=SC2086  # TORCHRUN_ARGS (set by train.slurm for multi-node runs) is a list of flags
exec torchrun ${TORCHRUN_ARGS:---nproc_per_node ${NPROC:-8}} pretrain_hybrid.py \
    --tensor-model-parallel-size $TP --sequence-parallel $PARALLEL_FLAGS \
    --use-distributed-optimizer --overlap-param-gather --overlap-grad-reduce \
    --untie-embeddings-and-output-weights --init-method-std 0.02 --position-embedding-type none \
    --num-layers $NUM_LAYERS --hidden-size $HIDDEN --num-attention-heads $HEADS \
    --group-query-attention --num-query-groups 8 --hybrid-attention-ratio 0.08 --hybrid-mlp-ratio 0.5 \
    --seq-length 4096 --max-position-embeddings 4096 \
    --train-samples 73242188 --lr-warmup-samples 50000 --lr-decay-samples 73192188 \
    --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --data-path "$DATA_PATH" --data-cache-path "$CHECKPOINT_DIR/data-cache" \
    --split 99,1,0 --no-create-attention-mask-in-dataloader \
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$TOKENIZER_PATH" --distributed-backend nccl \
    --micro-batch-size 4 --global-batch-size $GBS --lr 2.5e-4 --min-lr 2.5e-5 --lr-decay-style cosine \
    --weight-decay 0.1 --clip-grad 1.0 --attention-dropout 0.0 --hidden-dropout 0.0 --disable-bias-linear \
    --normalization RMSNorm --adam-beta1 0.9 --adam-beta2 0.95 --log-interval 10 --save-interval 2000 \
    --eval-interval 2000 --eval-iters 32 --bf16 --use-mcore-models \
    --spec megatron.core.models.mamba.mamba_layer_specs mamba_stack_spec --tensorboard-dir "$TENSORBOARD_DIR"
