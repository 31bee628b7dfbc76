from . import speculative  # noqa: F401  (registers the speculative strategies)
from .generate import GenerationResult, GenerationStats, StreamEvent, generate, register_strategy, stream
from .sampling import SamplingConfig, probabilities

__all__ = ["generate", "stream", "register_strategy", "GenerationResult", "GenerationStats", "StreamEvent",
           "SamplingConfig", "probabilities"]
