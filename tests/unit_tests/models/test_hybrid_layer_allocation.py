import pytest

from megatron.core.models.hybrid.hybrid_layer_allocation import (
    pattern_from_ratios,
    pipeline_segments,
    resolve_hybrid_pattern,
    validate_layer_pattern,
    validate_override_pattern,
)


@pytest.mark.parametrize(
    ("num_layers", "attention", "mlp", "expected"),
    [
        (48, 0.08, 0.5, "M-M-M--M-*M-M-M-M--*M-M-M-M-*M--M-M-M-*M-M--M-M-"),  # the 800M model
        (56, 0.08, 0.5, "M-M-M--M-M*-M-M-M-M--M*-M-M-M-M-M*--M-M-M-M-M*-M--M-M-M-"),  # the 8B model
        (10, 0.2, 0.0, "MMM*MM*MMM"),
        (5, 0.0, 0.0, "MMMMM"),
        (4, 1.0, 0.0, "****"),
        (4, 0.0, 1.0, "----"),
        (1, 0.0, 0.0, "M"),
        (1, 1.0, 0.0, "*"),
        (6, 0.5, 0.5, "-*-**-"),  # step 0.75 places * at 1, 3, 4; then every M becomes -
    ],
)
def test_pattern_from_ratios(num_layers, attention, mlp, expected):
    assert pattern_from_ratios(num_layers, attention, mlp) == expected


def test_ratio_counts_follow_rounding():
    pattern = pattern_from_ratios(48, 0.08, 0.5)
    assert (pattern.count("*"), pattern.count("-"), pattern.count("M")) == (round(48 * 0.08), 24, 20)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0,), "num_layers must be positive"),
        ((4, -0.1), "hybrid_attention_ratio must be in"),
        ((4, 0.0, 1.5), "hybrid_mlp_ratio must be in"),
        ((4, 0.6, 0.5), "must be <= 1"),
    ],
)
def test_ratio_errors(args, message):
    with pytest.raises(ValueError, match=message):
        pattern_from_ratios(*args)


def test_override_pattern_accepted_when_counts_match():
    assert validate_override_pattern("M*MMMMMMM*", 10, 0.2) == "M*MMMMMMM*"
    assert validate_override_pattern("M*-", 3) == "M*-"  # no ratios: any mix


@pytest.mark.parametrize(
    ("pattern", "num_layers", "attention", "mlp", "message"),
    [
        ("MMM", 4, 0.0, 0.0, "has length 3 but num_layers is 4"),
        ("MMX", 3, 0.0, 0.0, r"invalid symbol\(s\) \['X'\]"),
        ("MME", 3, 0.0, 0.0, "MoE layers"),
        ("M|M", 3, 0.0, 0.0, "invalid symbol"),
        ("MMMMMMMMM*", 10, 0.2, 0.0, "has 1 attention layers but the ratios .* give 2"),
        ("M*M*-MMMMM", 10, 0.2, 0.2, "has 1 MLP layers but the ratios .* give 2"),
    ],
)
def test_override_pattern_errors(pattern, num_layers, attention, mlp, message):
    with pytest.raises(ValueError, match=message):
        validate_override_pattern(pattern, num_layers, attention, mlp)


def test_layer_pattern_derives_num_layers_and_keeps_boundaries():
    assert resolve_hybrid_pattern(layer_pattern="M*|-M") == "M*|-M"
    assert resolve_hybrid_pattern(num_layers=4, layer_pattern="M*|-M") == "M*|-M"
    with pytest.raises(ValueError, match="has 4 layers but num_layers is 5"):
        resolve_hybrid_pattern(num_layers=5, layer_pattern="M*|-M")
    with pytest.raises(ValueError, match="segment 1 is empty"):
        validate_layer_pattern("M*||-M")
    with pytest.raises(ValueError, match="not both"):
        resolve_hybrid_pattern(layer_pattern="M", override_pattern="M")
    with pytest.raises(ValueError, match="num_layers is required"):
        resolve_hybrid_pattern()


def test_resolve_prefers_override_then_ratios():
    assert resolve_hybrid_pattern(num_layers=3, override_pattern="*-M") == "*-M"
    assert resolve_hybrid_pattern(num_layers=10, attention_ratio=0.2) == "MMM*MM*MMM"


def test_pipeline_segments():
    assert pipeline_segments("MM*-", 2) == ["MM", "*-"]
    assert pipeline_segments("M|M*|-|M", 2) == ["M", "M*", "-", "M"]  # 2 virtual stages per rank
    assert pipeline_segments("MM*-", 1) == ["MM*-"]
    with pytest.raises(ValueError, match="cannot be split evenly into 3 pipeline stages"):
        pipeline_segments("MM*-", 3)
    with pytest.raises(ValueError, match="3 pipeline segments, not a multiple of 2"):
        pipeline_segments("M|M|M", 2)
    with pytest.raises(ValueError, match="must be positive"):
        pipeline_segments("MM", 0)
