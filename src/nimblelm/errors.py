"""Exceptions nimblelm raises for bad input. Each message names what to change."""


class NimbleError(ValueError):
    """Base class of nimblelm's user-facing errors (a ValueError, so generic handlers still work)."""


class ConfigError(NimbleError):
    """A model config is malformed or inconsistent."""


class CheckpointError(NimbleError):
    """A checkpoint directory is missing files or holds weights that do not fit its config."""


class CacheOverflowError(NimbleError):
    """More tokens were written to a cache than it was allocated for."""


class GenerationError(NimbleError):
    """Arguments to generate/stream are invalid (token ids, lengths, strategy...)."""
