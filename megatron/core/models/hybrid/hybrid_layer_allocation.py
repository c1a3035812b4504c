"""Which layer type goes where in a hybrid stack.

A hybrid stack is written as a pattern string, one symbol per layer: ``M`` a Mamba layer, ``*`` a self-attention layer,
``-`` an MLP layer, and ``|`` a pipeline-stage boundary (not a layer). The pattern comes from one of three places,
exactly as in Megatron-LM so that published configurations reproduce:

* ratios (``--hybrid-attention-ratio`` / ``--hybrid-mlp-ratio``) spread over ``--num-layers``
  by :func:`pattern_from_ratios`;
* an override pattern (``--hybrid-override-pattern``) of length ``num_layers`` that must agree with non-zero ratios;
* a layer pattern (``--hybrid-layer-pattern``) that may hold ``|`` and from which ``num_layers`` is derived.

Every problem raises ``ValueError`` with a message that names it.
"""

from __future__ import annotations

MAMBA = "M"
ATTENTION = "*"
MLP = "-"
MOE = "E"
STAGE_BOUNDARY = "|"
LAYER_SYMBOLS = (MAMBA, ATTENTION, MLP)


def _check_ratios(num_layers: int, attention_ratio: float, mlp_ratio: float) -> None:
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    for name, ratio in (("hybrid_attention_ratio", attention_ratio), ("hybrid_mlp_ratio", mlp_ratio)):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {ratio}")
    if attention_ratio + mlp_ratio > 1.0:
        raise ValueError(
            f"hybrid_attention_ratio + hybrid_mlp_ratio must be <= 1, got {attention_ratio} + {mlp_ratio}"
        )


def pattern_from_ratios(num_layers: int, attention_ratio: float = 0.0, mlp_ratio: float = 0.0) -> str:
    """Spread attention and MLP layers evenly among Mamba layers, bit-for-bit as Megatron-LM does.

    Attention layers are placed first, evenly between Mamba runs; MLP layers then replace evenly spaced remaining
    Mamba layers. Returns a string of ``num_layers`` symbols from ``M``, ``*`` and ``-``.
    Example: ``pattern_from_ratios(10, 0.2) == "MMM*MM*MMM"``.
    """
    _check_ratios(num_layers, attention_ratio, mlp_ratio)
    layers = [MAMBA] * num_layers

    num_attention = round(num_layers * attention_ratio)
    num_mamba = num_layers - num_attention
    if num_attention > 0:
        step = num_mamba / (num_attention + 1)
        x = step
        for i in range(num_layers):
            if x < 0.5:
                layers[i] = ATTENTION
                x += step
            else:
                x -= 1

    num_mlp = round(num_layers * mlp_ratio)
    if num_mlp > 0:
        num_mamba -= num_mlp
        step = num_mamba / num_mlp
        x = step
        for i in range(num_layers):
            if layers[i] != MAMBA:
                continue
            if x < 0.5:
                layers[i] = MLP
                x += step
            else:
                x -= 1
    return "".join(layers)


def _check_symbols(pattern: str, allowed: str, flag: str) -> None:
    if MOE in pattern:
        raise ValueError(f"{flag} {pattern!r}: MoE layers ('E') are not supported; use M, * and -")
    bad = sorted({ch for ch in pattern if ch not in allowed})
    if bad:
        raise ValueError(f"{flag} {pattern!r} has invalid symbol(s) {bad}; allowed are {list(allowed)}")


def validate_override_pattern(
    pattern: str, num_layers: int, attention_ratio: float = 0.0, mlp_ratio: float = 0.0
) -> str:
    """Check an override pattern: length ``num_layers``, valid symbols, and (when a ratio is non-zero) the same number
    of each layer type as :func:`pattern_from_ratios` gives. Returns the pattern unchanged."""
    _check_ratios(num_layers, attention_ratio, mlp_ratio)
    _check_symbols(pattern, "".join(LAYER_SYMBOLS), "hybrid override pattern")
    if len(pattern) != num_layers:
        raise ValueError(
            f"hybrid override pattern {pattern!r} has length {len(pattern)} but num_layers is {num_layers}"
        )
    if attention_ratio > 0.0 or mlp_ratio > 0.0:
        expected = pattern_from_ratios(num_layers, attention_ratio, mlp_ratio)
        for symbol, name in ((ATTENTION, "attention"), (MLP, "MLP"), (MAMBA, "Mamba")):
            if pattern.count(symbol) != expected.count(symbol):
                raise ValueError(
                    f"hybrid override pattern {pattern!r} has {pattern.count(symbol)} {name} layers but the ratios "
                    f"(attention {attention_ratio}, mlp {mlp_ratio}) give {expected.count(symbol)}"
                )
    return pattern


def validate_layer_pattern(pattern: str) -> str:
    """Check a ``--hybrid-layer-pattern`` (layers and optional ``|`` stage boundaries): valid symbols and no empty
    pipeline segment. Returns the pattern unchanged."""
    _check_symbols(pattern, "".join(LAYER_SYMBOLS) + STAGE_BOUNDARY, "hybrid layer pattern")
    segments = pattern.split(STAGE_BOUNDARY)
    for index, segment in enumerate(segments):
        if not segment:
            raise ValueError(f"hybrid layer pattern {pattern!r}: pipeline segment {index} is empty")
    return pattern


def strip_stage_boundaries(pattern: str) -> str:
    """The layer symbols of a pattern without its ``|`` boundaries (one symbol per layer)."""
    return pattern.replace(STAGE_BOUNDARY, "")


def resolve_hybrid_pattern(
    num_layers: int | None = None,
    attention_ratio: float = 0.0,
    mlp_ratio: float = 0.0,
    override_pattern: str | None = None,
    layer_pattern: str | None = None,
) -> str:
    """The pattern a model is built from, given any of the three ways of stating it.

    ``layer_pattern`` wins and may contain ``|``; ``num_layers``, when also given, must match its layer count.
    Otherwise ``override_pattern`` (checked against the ratios) or the ratio pattern is returned.
    """
    if layer_pattern is not None:
        if override_pattern is not None:
            raise ValueError("give either a hybrid layer pattern or a hybrid override pattern, not both")
        validate_layer_pattern(layer_pattern)
        layers = strip_stage_boundaries(layer_pattern)
        if num_layers is not None and num_layers != len(layers):
            raise ValueError(
                f"hybrid layer pattern {layer_pattern!r} has {len(layers)} layers but num_layers is {num_layers}"
            )
        if attention_ratio > 0.0 or mlp_ratio > 0.0:
            validate_override_pattern(layers, len(layers), attention_ratio, mlp_ratio)
        return layer_pattern
    if num_layers is None:
        raise ValueError("num_layers is required unless a hybrid layer pattern is given")
    if override_pattern is not None:
        return validate_override_pattern(override_pattern, num_layers, attention_ratio, mlp_ratio)
    return pattern_from_ratios(num_layers, attention_ratio, mlp_ratio)


def pipeline_segments(pattern: str, num_stages: int) -> list[str]:
    """Split a pattern into pipeline segments, in order.

    With ``|`` the segments are the ones written; their number must be a multiple of ``num_stages`` (more segments
    than stages means interleaved virtual stages). Without ``|`` the layers split evenly into ``num_stages`` segments.
    """
    if num_stages <= 0:
        raise ValueError(f"the number of pipeline stages must be positive, got {num_stages}")
    validate_layer_pattern(pattern)
    if STAGE_BOUNDARY in pattern:
        segments = pattern.split(STAGE_BOUNDARY)
        if len(segments) % num_stages:
            raise ValueError(
                f"hybrid layer pattern {pattern!r} has {len(segments)} pipeline segments, "
                f"not a multiple of {num_stages} pipeline stages"
            )
        return segments
    if len(pattern) % num_stages:
        raise ValueError(
            f"{len(pattern)} layers cannot be split evenly into {num_stages} pipeline stages; "
            f"use a layer count divisible by {num_stages} or mark stages with '|'"
        )
    size = len(pattern) // num_stages
    return [pattern[i * size : (i + 1) * size] for i in range(num_stages)]
