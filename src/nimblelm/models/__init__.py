from .config import ModelConfig, preset_names
from .lm import LanguageModel, ModelOutput

__all__ = ["ModelConfig", "LanguageModel", "ModelOutput", "preset_names"]
