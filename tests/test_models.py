"""ModelSpec facts the driver states before any weights load."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from jobs.models import ModelSpec

SHAPES = {  # n_layer, n_embd, n_inner (None: 4 * n_embd)
    "gpt2": (12, 768, None), "gpt2-medium": (24, 1024, None), "gpt2-large": (36, 1280, None),
    "gpt2-xl": (48, 1600, None), "tiny, n_inner 64": (3, 32, 64),
}


@pytest.mark.parametrize("name", SHAPES)
def test_n_params_equals_the_models_parameter_count(name):
    n_layer, n_embd, n_inner = SHAPES[name]
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=4, n_inner=n_inner, n_positions=256 if n_inner else 1024)
    with torch.device("meta"):  # shapes only, no memory
        model = GPT2LMHeadModel(config)
    spec = ModelSpec(source=name, name=name, n_layer=n_layer, n_embd=n_embd, d_mlp=n_inner or 4 * n_embd,
                     n_positions=config.n_positions, vocab_size=config.vocab_size, config={})
    assert spec.n_params == sum(p.numel() for p in model.parameters())  # parameters() counts the tied head once


def test_loading_prints_no_carriage_return_bar(tiny_model_dir, capsys):
    """Transformers' "Loading weights" bar (carriage returns in every actor's log) is off; capture prints loading."""
    from transformers.utils import logging as hf_logging

    from jobs.models import load_model

    hf_logging.enable_progress_bar()
    spec = ModelSpec(source=tiny_model_dir, name="tiny", n_layer=3, n_embd=32, d_mlp=64, n_positions=256,
                     vocab_size=50257, config={})
    load_model(spec, "cpu", "float32")
    assert "Loading weights" not in capsys.readouterr().err
