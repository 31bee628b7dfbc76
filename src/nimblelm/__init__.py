"""nimblelm: efficient language models — sub-quadratic mixers, hybrids, and lossless
speculative decoding. See README.md for the public interface."""

import torch as _torch

from .cache import Cache, TreeSpec
from .errors import CacheOverflowError, CheckpointError, ConfigError, GenerationError, NimbleError
from .generation import GenerationResult, generate, stream
from .generation import watermark
from .models import LanguageModel, ModelConfig, ModelOutput, preset_names
from .models.checkpoint import load_model as load
from .drafter_io import load_drafter

__version__ = "0.1.0"

_torch.set_flush_denormal(True)  # denormal floats slow CPU matmuls 3-4x

__all__ = ["ModelConfig", "LanguageModel", "ModelOutput", "Cache", "TreeSpec", "generate", "stream", "load", "load_drafter",
           "GenerationResult", "watermark", "preset_names", "NimbleError", "ConfigError", "CheckpointError",
           "CacheOverflowError", "GenerationError", "__version__"]
