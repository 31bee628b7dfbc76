"""nn.Module building blocks; importing this package registers every mixer and FFN."""

from . import attention, deltanet, ffn, linear_attention, mamba, mamba2, rglru, short_conv, ttt  # noqa: F401
from .registry import FFNS, MIXERS, register_ffn, register_mixer  # noqa: F401
