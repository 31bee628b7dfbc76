"""Name -> class registries for sequence mixers and FFNs.

A mixer class is constructed as ``cls(config, layer_idx)`` and implements
``forward(x, info, state=None) -> (y, state)`` and ``init_state(batch, max_len, device, dtype)``
(see :mod:`nimblelm.cache`). An FFN class is constructed the same way and implements
``forward(x) -> (y, aux_loss_or_None)``. Registering is one decorator line per class.
"""

from __future__ import annotations

from typing import Callable

from ..errors import ConfigError

MIXERS: dict[str, type] = {}
FFNS: dict[str, type | None] = {"none": None}


def register_mixer(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        MIXERS[name] = cls
        return cls

    return add


def register_ffn(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        FFNS[name] = cls
        return cls

    return add


def mixer_class(name: str) -> type:
    if name not in MIXERS:
        raise ConfigError(f"unknown mixer {name!r} in mixer_pattern; known mixers: {', '.join(sorted(MIXERS))}")
    return MIXERS[name]


def ffn_class(name: str) -> type | None:
    if name not in FFNS:
        raise ConfigError(f"unknown FFN {name!r} in ffn_pattern; known FFNs: {', '.join(sorted(FFNS))}")
    return FFNS[name]
