"""Text <-> token ids for a model: its own tokenizers.Tokenizer when it has one, else raw
UTF-8 bytes (ids 0..255) for models whose vocabulary covers them (random preset models)."""

from __future__ import annotations

from .errors import GenerationError


def encode_text(model, text: str) -> list[int]:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer.encode(text).ids
    if model.config.vocab_size < 256:
        raise GenerationError("this model has no tokenizer and fewer than 256 token ids; pass --prompt-ids instead of --prompt")
    return list(text.encode("utf-8"))


def decode_tokens(model, ids: list[int]) -> str:
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        return tokenizer.decode(ids, skip_special_tokens=False)
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
