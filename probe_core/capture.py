"""Named hook points on a Hugging Face GPT-2 and a scoped activation cache.

Hook names follow TransformerLens:
- ``blocks.{l}.mlp.hook_pre``: output of ``h[l].mlp.c_fc`` (pre-GELU), (B, T, d_mlp)
- ``blocks.{l}.hook_attn_out``: first output of ``h[l].attn`` (``c_proj`` output, before the residual add), (B, T, d)
- ``ln_final.hook_in``: the last block's output, the input of ``ln_f``, (B, T, d)

Layers ``l`` are 0-based here (block index); tables number layers 1..n_layer (hidden_states index).
Hooks store what a reducer returns, so a hook can keep only the rows or the norms a stage needs
instead of a full (B, T, d) activation.
"""
from contextlib import contextmanager
from typing import Callable

import torch

Reducer = Callable[[torch.Tensor], torch.Tensor]


def mlp_pre(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_pre"


def attn_out(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


LN_FINAL_IN = "ln_final.hook_in"


def hook_module(model, name: str) -> tuple[torch.nn.Module, bool]:
    """The module behind a hook name and whether its input (True) or output (False) is captured."""
    if name == LN_FINAL_IN:
        return model.transformer.ln_f, True
    parts = name.split(".")
    site = ".".join(parts[2:])
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit() or site not in ("mlp.hook_pre", "hook_attn_out"):
        raise ValueError(f"unknown hook name {name!r}")
    block = model.transformer.h[int(parts[1])]
    return (block.mlp.c_fc, False) if site == "mlp.hook_pre" else (block.attn, False)


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


@contextmanager
def capture(model, reducers: dict[str, Reducer]):
    """Register one hook per name for the duration of the block; yields a fresh cache dict.

    After a forward pass, ``cache[name]`` holds ``reducers[name](activation)``. Hooks are removed in
    ``finally`` so an exception never leaves them on the model.
    """
    cache: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, reduce in reducers.items():
            module, on_input = hook_module(model, name)

            def store(activation, name=name, reduce=reduce):
                cache[name] = reduce(activation)

            if on_input:
                handles.append(module.register_forward_pre_hook(lambda m, args, store=store: store(_first(args))))
            else:
                handles.append(module.register_forward_hook(lambda m, args, out, store=store: store(_first(out))))
        yield cache
    finally:
        for handle in handles:
            handle.remove()


def stack_hidden(hidden_states, final_hidden: str = "hf", pre_ln_f: torch.Tensor | None = None) -> torch.Tensor:
    """Stack HF ``hidden_states`` into (n_layer + 1, B, T, d).

    ``final_hidden="hf"`` keeps the last entry as HF returns it (after ``ln_f``); ``"pre_ln_f"``
    replaces it with the last block's output before ``ln_f`` (``pre_ln_f``, from ``LN_FINAL_IN``).
    """
    if final_hidden not in ("hf", "pre_ln_f"):
        raise ValueError(f"final_hidden must be 'hf' or 'pre_ln_f', got {final_hidden!r}")
    layers = list(hidden_states)
    if final_hidden == "pre_ln_f":
        if pre_ln_f is None:
            raise ValueError("final_hidden='pre_ln_f' needs the ln_final.hook_in activation")
        layers[-1] = pre_ln_f
    return torch.stack(layers)
