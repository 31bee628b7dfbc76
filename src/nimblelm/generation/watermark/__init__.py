"""SynthID-Text watermarking: tournament sampling that composes with speculative decoding,
and calibrated detectors. ``nl.watermark.SynthID(keys=[...])``, ``nl.watermark.detect(...)``."""

from .bayesian import BayesianDetector
from .config import SynthID, WatermarkError
from .detect import Detection, detect, text_g_values, threshold
from .hashing import g_values
from .session import WatermarkSession, apply_watermark, watermark_mask
from .tournament import tournament

__all__ = ["SynthID", "WatermarkError", "detect", "Detection", "BayesianDetector", "threshold", "text_g_values",
           "g_values", "tournament", "WatermarkSession", "apply_watermark", "watermark_mask"]
