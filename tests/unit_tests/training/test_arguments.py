"""Command-line arguments: Megatron-LM's flag set parses, defaults match, every invalid combination is rejected with
one line naming the flag, and the args map onto TransformerConfig."""

import re

import pytest
import torch
import torch.nn.functional as F

from megatron.core.transformer.transformer_config import squared_relu
from megatron.training.arguments import ArgumentError, core_transformer_config_from_args, parse_args

PATTERN_8B = "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"
PATTERN_800M = "M-M-M--M-*M-M-M-M--*M-M-M-M-*M--M-M-M-*M-M--M-M-"


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def train_sh_argv(tmp_path, tp: int, layers: int, hidden: int, heads: int, gbs: int) -> list[str]:
    """The options of Megatron-LM's examples/mamba/train.sh, with its values for one model scale."""
    return [
        "--tensor-model-parallel-size", str(tp),
        "--sequence-parallel",
        "--pipeline-model-parallel-size", "1",
        "--use-distributed-optimizer",
        "--overlap-param-gather",
        "--overlap-grad-reduce",
        "--untie-embeddings-and-output-weights",
        "--init-method-std", "0.02",
        "--position-embedding-type", "none",
        "--num-layers", str(layers),
        "--hidden-size", str(hidden),
        "--num-attention-heads", str(heads),
        "--group-query-attention",
        "--num-query-groups", "8",
        "--hybrid-attention-ratio", "0.08",
        "--hybrid-mlp-ratio", "0.5",
        "--seq-length", "4096",
        "--max-position-embeddings", "4096",
        "--train-samples", "73242188",
        "--lr-warmup-samples", "50000",
        "--lr-decay-samples", "73192188",
        "--save", str(tmp_path / "checkpoints"),
        "--load", str(tmp_path / "checkpoints"),
        "--data-path", str(tmp_path / "data" / "corpus_text_document"),
        "--data-cache-path", str(tmp_path / "data-cache"),
        "--split", "99,1,0",
        "--no-create-attention-mask-in-dataloader",
        "--tokenizer-type", "GPTSentencePieceTokenizer",
        "--tokenizer-model", str(tmp_path / "tokenizer.model"),
        "--distributed-backend", "nccl",
        "--micro-batch-size", "4",
        "--global-batch-size", str(gbs),
        "--lr", "2.5e-4",
        "--min-lr", "2.5e-5",
        "--lr-decay-style", "cosine",
        "--weight-decay", "0.1",
        "--clip-grad", "1.0",
        "--attention-dropout", "0.0",
        "--hidden-dropout", "0.0",
        "--disable-bias-linear",
        "--normalization", "RMSNorm",
        "--adam-beta1", "0.9",
        "--adam-beta2", "0.95",
        "--log-interval", "10",
        "--save-interval", "2000",
        "--eval-interval", "2000",
        "--eval-iters", "32",
        "--bf16",
        "--use-mcore-models",
        "--spec", "megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec",
        "--no-create-attention-mask-in-dataloader",
        "--tensorboard-dir", str(tmp_path / "tensorboard"),
    ]


def test_train_sh_8b(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")  # torchrun --nproc_per_node 8
    args = parse_args(train_sh_argv(tmp_path, tp=4, layers=56, hidden=4096, heads=32, gbs=8))
    assert args.hybrid_layer_pattern == PATTERN_8B and args.num_layers == 56
    assert (args.world_size, args.data_parallel_size, args.num_microbatches) == (8, 2, 1)
    assert args.tensor_model_parallel_size == 4 and args.sequence_parallel
    assert args.distributed_backend == "gloo"  # no CUDA here
    assert args.use_distributed_optimizer and args.overlap_param_gather and args.overlap_grad_reduce
    assert args.untie_embeddings_and_output_weights and args.use_mcore_models
    assert args.add_bias_linear is False and args.disable_bias_linear is True
    assert args.create_attention_mask_in_dataloader is False
    assert args.spec == ["megatron.core.models.mamba.mamba_layer_specs", "mamba_stack_spec"]
    assert args.position_embedding_type == "none" and args.normalization == "RMSNorm"
    assert (args.num_attention_heads, args.num_query_groups, args.kv_channels) == (32, 8, 128)
    assert args.ffn_hidden_size == 4 * 4096
    assert (args.train_samples, args.lr_warmup_samples, args.lr_decay_samples) == (73242188, 50000, 73192188)
    assert (args.lr, args.min_lr, args.lr_decay_style) == (2.5e-4, 2.5e-5, "cosine")
    assert (args.weight_decay, args.start_weight_decay, args.end_weight_decay) == (0.1, 0.1, 0.1)
    assert (args.adam_beta1, args.adam_beta2, args.clip_grad) == (0.9, 0.95, 1.0)
    assert args.split == "99,1,0" and args.data_path == [str(tmp_path / "data" / "corpus_text_document")]
    assert (args.log_interval, args.save_interval, args.eval_interval, args.eval_iters) == (10, 2000, 2000, 32)
    assert args.bf16 and args.params_dtype == torch.bfloat16
    assert args.max_position_embeddings == args.seq_length == 4096
    assert not (tmp_path / "checkpoints").exists()  # validation writes nothing


def test_train_sh_800m(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    args = parse_args(train_sh_argv(tmp_path, tp=1, layers=48, hidden=1024, heads=16, gbs=32))
    assert args.hybrid_layer_pattern == PATTERN_800M
    assert (args.data_parallel_size, args.num_microbatches) == (8, 1)
    assert args.sequence_parallel is False  # Megatron turns it off without tensor parallelism


def test_text_generation_server_flags(tmp_path):
    """run_text_gen_server_8b.sh: a layer pattern instead of --num-layers, no training flags."""
    args = parse_args([
        "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "1",
        "--untie-embeddings-and-output-weights", "--hybrid-layer-pattern", PATTERN_8B, "--hidden-size", "4096",
        "--load", str(tmp_path), "--num-attention-heads", "32", "--group-query-attention", "--num-query-groups", "8",
        "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--disable-bias-linear", "--normalization",
        "RMSNorm", "--seq-length", "4096", "--max-position-embeddings", "4096", "--position-embedding-type", "none",
        "--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", "tok.model", "--distributed-backend",
        "nccl", "--distributed-timeout-minutes", "1440", "--bf16", "--micro-batch-size", "1", "--use-mcore-models",
        "--spec", "megatron.core.models.hybrid.hybrid_layer_specs", "hybrid_stack_spec", "--seed", "42",
    ], training=False)
    assert args.num_layers == 56 and args.hybrid_layer_pattern == PATTERN_8B and args.seed == 42


def test_megatron_defaults():
    args = parse_args(["--num-layers", "2", "--hidden-size", "512", "--num-attention-heads", "4", "--seq-length", "32",
                       "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--mock-data",
                       "--tokenizer-type", "NullTokenizer", "--vocab-size", "100"])
    expected = dict(
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, position_embedding_type="learned_absolute",
        normalization="LayerNorm", add_bias_linear=True, swiglu=False, squared_relu=False, init_method_std=0.02,
        hidden_dropout=0.1, attention_dropout=0.1, lr_decay_style="linear", lr_wsd_decay_style="exponential",
        weight_decay=0.01, weight_decay_incr_style="constant", clip_grad=1.0, adam_beta1=0.9, adam_beta2=0.999,
        adam_eps=1e-8, seed=1234, log_interval=100, eval_interval=1000, eval_iters=100, save_interval=None,
        split="969, 30, 1", make_vocab_size_divisible_by=128, mamba_state_dim=128, mamba_head_dim=64,
        mamba_num_groups=8, mamba_num_heads=None, mamba_version=2, rotary_base=10000, rotary_percent=1.0,
        min_lr=0.0, lr_warmup_iters=0, lr_warmup_samples=0, lr_warmup_fraction=None, hybrid_attention_ratio=0.0,
        hybrid_mlp_ratio=0.0, hybrid_override_pattern=None, num_workers=2, untie_embeddings_and_output_weights=False,
        create_attention_mask_in_dataloader=True, distributed_backend="gloo", fp16=False, bf16=False,
        loss_scale=None, initial_loss_scale=2.0**32, wandb_project="", tensorboard_dir=None, exit_interval=None,
        exit_duration_in_mins=None, exit_signal_handler=False, skip_train=False, finetune=False, save=None, load=None,
        group_query_attention=False, sequence_parallel=False, use_distributed_optimizer=False, data_path=None,
        data_cache_path=None, global_batch_size=2, num_microbatches=1, data_parallel_size=1, world_size=1,
        params_dtype=torch.float32, hybrid_layer_pattern="MM", max_position_embeddings=32, ffn_hidden_size=2048,
        kv_channels=128, num_query_groups=4, norm_epsilon=1e-5,
    )
    assert {key: getattr(args, key) for key in expected} == expected


def test_nccl_kept_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = parse_args([*BASE, "--distributed-backend", "nccl"])
    assert args.distributed_backend == "nccl"


BASE = ["--num-layers", "4", "--hybrid-attention-ratio", "0.25", "--hidden-size", "32", "--num-attention-heads", "4",
        "--mamba-head-dim", "8", "--mamba-num-groups", "2", "--mamba-state-dim", "8", "--seq-length", "16",
        "--micro-batch-size", "2", "--train-iters", "10", "--lr", "1e-3", "--mock-data",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "50"]


def without(argv: list[str], *flags: str) -> list[str]:
    """``argv`` without ``flags`` and their values."""
    result, skip = [], False
    for item in argv:
        if skip and not item.startswith("--"):
            continue
        skip = item in flags
        if not skip:
            result.append(item)
    return result


def test_base_is_valid():
    args = parse_args(BASE)
    assert args.hybrid_layer_pattern == "MM*M" and args.global_batch_size == 2


def test_batch_sizes_and_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    args = parse_args([*BASE, "--global-batch-size", "24"])
    assert (args.data_parallel_size, args.num_microbatches) == (4, 3)
    args = parse_args(BASE)
    assert args.global_batch_size == 8


def test_iteration_and_sample_units_and_warmup_fraction():
    args = parse_args([*without(BASE, "--train-iters"), "--train-samples", "100", "--lr-warmup-samples", "10"])
    assert args.train_iters is None and args.train_samples == 100
    args = parse_args([*BASE, "--lr-warmup-fraction", "0.1"])
    assert args.lr_warmup_fraction == 0.1


def test_weight_decay_ramp():
    args = parse_args([*BASE, "--weight-decay-incr-style", "cosine", "--start-weight-decay", "0.0",
                       "--end-weight-decay", "0.1"])
    assert (args.start_weight_decay, args.end_weight_decay) == (0.0, 0.1)


def test_pattern_styles():
    args = parse_args([*without(BASE, "--hybrid-attention-ratio"), "--hybrid-override-pattern", "M*-M"])
    assert args.hybrid_layer_pattern == "M*-M" and args.num_layers == 4
    args = parse_args([*without(BASE, "--num-layers", "--hybrid-attention-ratio"), "--hybrid-layer-pattern", "M*|-M"])
    assert args.hybrid_layer_pattern == "M*|-M" and args.num_layers == 4
    args = parse_args([*without(BASE, "--num-attention-heads"), "--hybrid-attention-ratio", "0"])
    assert args.hybrid_layer_pattern == "MMMM" and args.num_attention_heads == 0


def test_pipeline_split(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_args([*BASE, "--pipeline-model-parallel-size", "2"])
    assert args.data_parallel_size == 1
    with pytest.raises(ArgumentError, match=r"--pipeline-model-parallel-size 2: .*cannot be split evenly"):
        parse_args([*without(BASE, "--num-layers"), "--num-layers", "5", "--pipeline-model-parallel-size", "2"])
    args = parse_args([*without(BASE, "--num-layers", "--hybrid-attention-ratio"), "--hybrid-layer-pattern", "M*M|MM",
                       "--pipeline-model-parallel-size", "2"])
    assert args.num_layers == 5


def test_ffn_defaults():
    assert parse_args(BASE).ffn_hidden_size == 128
    assert parse_args([*without(BASE, "--hidden-size"), "--hidden-size", "96", "--swiglu"]).ffn_hidden_size == 256
    assert parse_args([*BASE, "--ffn-hidden-size", "40", "--swiglu"]).ffn_hidden_size == 40


ERRORS = [
    # (changes to BASE: flags to drop, flags to add, message fragment that must appear)
    ((), ["--tensor-model-parallel-size", "2"],
     "world size 1 is not divisible by --tensor-model-parallel-size 2 x --pipeline-model-parallel-size 1"),
    ((), ["--tensor-model-parallel-size", "0"], "--tensor-model-parallel-size must be >= 1"),
    ((), ["--global-batch-size", "3"], "--global-batch-size 3 is not a multiple of --micro-batch-size 2"),
    ((), ["--micro-batch-size", "0"], "--micro-batch-size must be positive"),
    (("--micro-batch-size",), [], "--micro-batch-size is required"),
    ((), ["--train-samples", "100"], "either --train-iters or --train-samples, not both"),
    (("--train-iters",), [], "one of --train-iters or --train-samples is required"),
    ((), ["--lr-warmup-samples", "5"], "--lr-warmup-samples cannot be used with --train-iters"),
    ((), ["--lr-decay-samples", "5"], "--lr-decay-samples cannot be used with --train-iters"),
    (("--train-iters",), ["--train-samples", "100", "--lr-decay-iters", "5"],
     "--lr-decay-iters cannot be used with --train-samples"),
    ((), ["--lr-warmup-iters", "10"], "--lr-warmup-iters (10) must be smaller than the decay length"),
    ((), ["--lr-warmup-iters", "2", "--lr-warmup-fraction", "0.1"], "--lr-warmup-fraction or --lr-warmup-iters"),
    ((), ["--lr-warmup-fraction", "1.5"], "--lr-warmup-fraction must be in [0, 1)"),
    ((), ["--lr-decay-style", "WSD"], "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    ((), ["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "20"], "--lr-wsd-decay-iters (20) must not exceed"),
    (("--lr",), [], "--lr is required for training"),
    ((), ["--min-lr", "1e-2"], "--min-lr 0.01 must be in [0, --lr 0.001]"),
    ((), ["--start-weight-decay", "0.1"], "--start-weight-decay/--end-weight-decay need --weight-decay-incr-style"),
    ((), ["--weight-decay-incr-style", "linear"], "--weight-decay-incr-style linear needs --start-weight-decay"),
    ((), ["--weight-decay-incr-style", "linear", "--start-weight-decay", "0.2", "--end-weight-decay", "0.1"],
     "--start-weight-decay (0.2) <= --end-weight-decay (0.1)"),
    ((), ["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    ((), ["--adam-beta2", "1.0"], "--adam-beta2 must be in [0, 1)"),
    ((), ["--hybrid-mlp-ratio", "1.5"], "--hybrid-mlp-ratio must be in [0, 1]"),
    ((), ["--hybrid-attention-ratio", "-0.1"], "--hybrid-attention-ratio must be in [0, 1]"),
    ((), ["--hybrid-mlp-ratio", "0.9"], "--hybrid-attention-ratio + --hybrid-mlp-ratio must be <= 1"),
    (("--num-layers",), [], "--num-layers is required (or give --hybrid-layer-pattern)"),
    ((), ["--hybrid-override-pattern", "MMMMM"], "--hybrid-override-pattern: hybrid override pattern 'MMMMM' has "
                                                 "length 5"),
    ((), ["--hybrid-override-pattern", "MMMM"], "--hybrid-override-pattern: .* has 0 attention layers"),
    ((), ["--hybrid-override-pattern", "ME*M"], "MoE layers ('E') are not supported"),
    (("--num-layers",), ["--hybrid-layer-pattern", "MM*X"], "--hybrid-layer-pattern: .*invalid symbol"),
    ((), ["--hybrid-layer-pattern", "MM*M*"], "--hybrid-layer-pattern: .* has 5 layers but num_layers is 4"),
    ((), ["--hybrid-layer-pattern", "MM*M", "--hybrid-override-pattern", "MM*M"],
     "either --hybrid-layer-pattern or --hybrid-override-pattern"),
    (("--hidden-size",), [], "--hidden-size is required"),
    (("--num-attention-heads",), [], "--num-attention-heads is required: the layer pattern has attention layers"),
    (("--hidden-size",), ["--hidden-size", "30"], "--hidden-size 30 is not divisible by --num-attention-heads 4"),
    ((), ["--group-query-attention", "--num-query-groups", "3"],
     "--num-attention-heads 4 is not divisible by --num-query-groups 3"),
    ((), ["--mamba-num-groups", "3"], "Mamba head count 8 is not divisible by --mamba-num-groups 3"),
    ((), ["--mamba-head-dim", "7"], "is not divisible by --mamba-head-dim 7"),
    ((), ["--swiglu", "--squared-relu"], "--swiglu and --squared-relu cannot be used together"),
    (("--hidden-size",), ["--hidden-size", "16", "--swiglu", "--num-attention-heads", "4"],
     "set --ffn-hidden-size"),
    ((), ["--bf16", "--fp16"], "--bf16 and --fp16 cannot be used together"),
    ((), ["--hidden-dropout", "1.0"], "--hidden-dropout must be in [0, 1)"),
    ((), ["--rotary-percent", "0"], "--rotary-percent must be in (0, 1]"),
    (("--seq-length",), [], "--seq-length is required"),
    ((), ["--max-position-embeddings", "8"], "--seq-length 16 exceeds --max-position-embeddings 8"),
    (("--vocab-size",), [], "--tokenizer-type NullTokenizer needs --vocab-size"),
    (("--tokenizer-type", "--vocab-size"), [], "--tokenizer-type is required"),
    (("--tokenizer-type",), ["--tokenizer-type", "HuggingFaceTokenizer"],
     "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model"),
    ((), ["--vocab-size", "0"], "--vocab-size must be positive"),
    (("--mock-data",), [], "--data-path (or --mock-data) is required for training"),
    ((), ["--data-path", "corpus"], "either --mock-data or --data-path, not both"),
    ((), ["--split", "99,x"], "--split '99,x' must be up to three comma-separated numbers"),
    ((), ["--split", "0,0,0"], "--split '0,0,0' must be up to three non-negative numbers with a positive sum"),
    ((), ["--eval-interval", "0"], "--eval-interval must be positive"),
    ((), ["--log-interval", "-1"], "--log-interval must be positive"),
    ((), ["--exit-duration-in-mins", "0"], "--exit-duration-in-mins must be positive"),
]


@pytest.mark.parametrize(("drop", "add", "message"), ERRORS, ids=[e[2][:50] for e in ERRORS])
def test_validation_errors(drop, add, message):
    with pytest.raises(ArgumentError) as info:
        parse_args(without(BASE, *drop) + add)
    text = str(info.value)
    assert "\n" not in text
    if ".*" in message:
        assert re.search(message, text), text
    else:
        assert message in text, text


def test_unwritable_directories(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ArgumentError, match=r"^--save .* exists and is not a directory$"):
        parse_args([*BASE, "--save", str(blocker)])
    with pytest.raises(ArgumentError, match=r"^--tensorboard-dir .* cannot be created"):
        parse_args([*BASE, "--tensorboard-dir", str(blocker / "tb")])
    parse_args([*BASE, "--save", str(tmp_path / "new" / "deeper")])
    assert not (tmp_path / "new").exists()


def test_world_size_must_be_an_integer(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ArgumentError, match="WORLD_SIZE='two' is not an integer"):
        parse_args(BASE)


@pytest.mark.parametrize(("extra", "message"), [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--tokenizer-type", "BertWordPieceLowerCase"], "argument --tokenizer-type: invalid choice"),
    (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    (["--lr-decay-style", "step"], "argument --lr-decay-style: invalid choice"),
    (["--mamba-version", "3"], "argument --mamba-version: invalid choice"),
    (["--position-embedding-type", "alibi"], "argument --position-embedding-type: invalid choice"),
])
def test_parser_errors_raise_one_line(extra, message):
    with pytest.raises(ArgumentError, match=message) as info:
        parse_args(BASE + extra)
    assert "\n" not in str(info.value)


def test_ignore_unknown_args():
    assert parse_args([*BASE, "--no-such-flag", "3"], ignore_unknown_args=True).num_layers == 4


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--overlap-grad-reduce" in out and "no effect" in " ".join(out.split())


def test_config_mapping_defaults():
    args = parse_args([*BASE, "--mamba-num-heads", "8", "--mamba-version", "2", "--norm-epsilon", "1e-6"])
    config = core_transformer_config_from_args(args)
    assert config.num_layers == 4 and config.hidden_size == 32
    assert (config.num_attention_heads, config.num_query_groups, config.kv_channels) == (4, 4, 8)
    assert config.ffn_hidden_size == 128 and config.activation_func is F.gelu and not config.gated_linear_unit
    assert config.add_bias_linear and config.normalization == "LayerNorm" and config.layernorm_epsilon == 1e-6
    assert (config.hidden_dropout, config.attention_dropout, config.init_method_std) == (0.1, 0.1, 0.02)
    assert config.params_dtype == torch.float32
    assert (config.mamba_state_dim, config.mamba_head_dim, config.mamba_num_groups, config.mamba_num_heads,
            config.mamba_version) == (8, 8, 2, 8, 2)


def test_config_mapping_variants():
    config = core_transformer_config_from_args(parse_args(
        [*BASE, "--swiglu", "--ffn-hidden-size", "48", "--disable-bias-linear", "--normalization", "RMSNorm",
         "--group-query-attention", "--num-query-groups", "2", "--bf16", "--hidden-dropout", "0.0",
         "--attention-dropout", "0.0", "--init-method-std", "0.01"]))
    assert config.activation_func is F.silu and config.gated_linear_unit and config.ffn_hidden_size == 48
    assert not config.add_bias_linear and config.normalization == "RMSNorm"
    assert config.num_query_groups == 2 and config.params_dtype == torch.bfloat16
    assert (config.hidden_dropout, config.attention_dropout, config.init_method_std) == (0.0, 0.0, 0.01)

    config = core_transformer_config_from_args(parse_args([*BASE, "--squared-relu", "--fp16"]))
    assert config.activation_func is squared_relu and not config.gated_linear_unit
    assert config.params_dtype == torch.float16


def test_config_builds_the_model():
    from megatron.core.models.hybrid import HybridModel

    args = parse_args([*BASE, "--position-embedding-type", "rope", "--hidden-dropout", "0.0"])
    model = HybridModel(core_transformer_config_from_args(args), 64, args.max_position_embeddings,
                        hybrid_layer_pattern=args.hybrid_layer_pattern,
                        position_embedding_type=args.position_embedding_type)
    assert model.hybrid_pattern == "MM*M"
    logits = model(torch.randint(0, 64, (1, 16)), torch.arange(16)[None])
    assert logits.shape[-1] == 64


PARALLEL_ERRORS = [
    # (world size, flags added to BASE, message fragment)
    (3, ["--tensor-model-parallel-size", "3"],
     "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (4, ["--tensor-model-parallel-size", "4", "--group-query-attention", "--num-query-groups", "2"],
     "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (4, ["--tensor-model-parallel-size", "4"], r"Mamba heads \(8\) and --mamba-num-groups \(2\) must be divisible by "
                                                "--tensor-model-parallel-size 4"),
    (2, ["--tensor-model-parallel-size", "2", "--hybrid-mlp-ratio", "0.25", "--ffn-hidden-size", "33"],
     "--ffn-hidden-size 33 is not divisible by --tensor-model-parallel-size 2"),
    (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "15"],
     "--seq-length 15 is not divisible by --tensor-model-parallel-size 2"),
    (2, ["--pipeline-model-parallel-size", "2", "--hybrid-layer-pattern", "M|*|M"],
     "3 pipeline segments, not a multiple of 2 pipeline stages"),
]


@pytest.mark.parametrize(("world", "extra", "message"), PARALLEL_ERRORS)
def test_parallel_layout_errors_name_the_numbers(monkeypatch, world, extra, message):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    argv = without(BASE, "--num-layers", "--hybrid-attention-ratio") if "--hybrid-layer-pattern" in extra else BASE
    with pytest.raises(ArgumentError, match=message):
        parse_args([*argv, *extra])


def test_interleaved_pattern_sets_virtual_pipeline_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = parse_args([*without(BASE, "--num-layers", "--hybrid-attention-ratio"), "--hybrid-layer-pattern",
                       "M*|MM|M-|MM", "--pipeline-model-parallel-size", "2"])
    assert args.virtual_pipeline_model_parallel_size == 2 and args.num_layers == 8
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parse_args([*BASE, "--pipeline-model-parallel-size", "2"]).virtual_pipeline_model_parallel_size is None
