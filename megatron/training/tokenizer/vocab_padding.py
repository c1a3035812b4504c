"""Megatron's padding of the vocabulary to a GPU- and tensor-parallel-friendly size."""


def padded_vocab_size(orig_vocab_size: int, make_vocab_size_divisible_by: int = 128,
                      tensor_model_parallel_size: int = 1) -> int:
    """The smallest multiple of ``make_vocab_size_divisible_by * tensor_model_parallel_size`` >= ``orig_vocab_size``.

    E.g. 50257 -> 50304 (divisible by 128), and with tensor parallel size 2 -> 50432 (divisible by 256).
    """
    for name, value in (("vocabulary size", orig_vocab_size),
                        ("--make-vocab-size-divisible-by", make_vocab_size_divisible_by),
                        ("--tensor-model-parallel-size", tensor_model_parallel_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    return -(-orig_vocab_size // multiple) * multiple
