"""Config presets: paper Table 1 parameter counts, module counts, errors."""
from __future__ import annotations

import pytest

from palm_fast.config import PRESETS, PaLMConfig, get_config
from palm_fast.reference import PaLM

# PaLM paper Table 1 (billions of parameters).
TABLE1 = {"palm-8b": 8.63, "palm-62b": 62.50, "palm-540b": 540.35}


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_table1_param_counts(name):
    cfg = get_config(name)
    assert abs(cfg.param_count() / 1e9 - TABLE1[name]) < 0.01
    assert cfg.vocab_size == 256000 and cfg.head_dim == 256 and cfg.d_ff == 4 * cfg.d_model
    assert cfg.n_kv_heads == 1 and cfg.max_seq_len == 2048


def test_table1_shapes():
    shapes = {n: (c.n_layers, c.n_heads, c.d_model) for n, c in PRESETS.items() if n in TABLE1}
    assert shapes == {"palm-8b": (32, 16, 4096), "palm-62b": (64, 32, 8192),
                      "palm-540b": (118, 48, 18432)}
    # 540B: heads x head dim != d_model (head dim is never derived).
    c = get_config("palm-540b")
    assert c.n_heads * c.head_dim == 12288 != c.d_model


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 2}, {"n_kv_heads": 4, "rotary_dim": 8}])
def test_module_param_count_matches_formula(overrides):
    cfg = get_config("palm-tiny", **overrides)
    assert PaLM(cfg).num_params() == cfg.param_count()


def test_palm_1b_size():
    assert 0.9e9 <= get_config("palm-1b").param_count() <= 1.1e9


def test_small_presets_exist():
    for name in ("palm-tiny", "palm-small", "palm-1b"):
        assert get_config(name).name == name


def test_get_config_returns_a_copy():
    cfg = get_config("palm-tiny")
    cfg.n_layers = 7
    assert get_config("palm-tiny").n_layers == 2
    assert get_config("palm-tiny", n_layers=3).n_layers == 3


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown PaLM preset 'palm-9b'.*palm-540b"):
        get_config("palm-9b")


@pytest.mark.parametrize("kwargs, match", [
    ({"n_kv_heads": 3}, "n_kv_heads"),
    ({"head_dim": 0}, "head_dim"),
    ({"rotary_dim": 7}, "rotary_dim"),
    ({"rotary_dim": 32}, "rotary_dim"),
])
def test_invalid_config(kwargs, match):
    base = dict(vocab_size=16, d_model=8, n_layers=1, n_heads=4, head_dim=16, d_ff=8)
    with pytest.raises(ValueError, match=match):
        PaLMConfig(**{**base, **kwargs})
