"""Drafter checkpoints: ``nl.load_drafter(path_or_name, kind)`` and :func:`save_drafter`.

A head drafter (kind ``medusa``, ``hydra`` or ``eagle``) is a directory with

* ``drafter.json``: ``{"format": "nimblelm-drafter", "kind": ..., "config": {head options},
  "target": {"hidden_size": D, "vocab_size": V}}``;
* ``drafter.safetensors``: only the heads' own weights (the token embedding and LM head are
  the target's, bound when generation starts). Weights may be stored as fp16 / bf16; they
  load as float32. Nothing is unpickled.
* optionally ``draft_vocab.safetensors`` (EAGLE only): one integer tensor ``token_ids``, the
  frequent tokens the head drafts from (FR-Spec; made offline from the training token stream
  by :func:`nimblelm.training.train_drafter.write_draft_vocab`). Without it the head drafts
  from the whole vocabulary. Only which tokens get drafted depends on it, never the output.

A ``sps`` drafter is a plain nimblelm checkpoint (``nl.load``) of a small draft LM,
returned wrapped in a :class:`DraftModelDrafter`.

``path_or_name`` is a drafter directory, or a model directory / shipped model name whose
``drafters/<kind>/`` holds one.
"""

from __future__ import annotations

import json
import os

import torch

from .errors import CheckpointError, GenerationError

DRAFTER_CONFIG, DRAFTER_WEIGHTS = "drafter.json", "drafter.safetensors"
DRAFT_VOCAB = "draft_vocab.safetensors"
KINDS = ("sps", "medusa", "hydra", "eagle")
FORMAT = "nimblelm-drafter"


def head_classes() -> dict:
    from .generation.speculative.drafters import EagleHead, HydraHeads, MedusaHeads

    return {"medusa": MedusaHeads, "hydra": HydraHeads, "eagle": EagleHead}


def save_drafter(heads: torch.nn.Module, directory: str, weight_dtype: torch.dtype | None = None) -> None:
    """Write ``heads`` (MedusaHeads, HydraHeads or EagleHead) as a drafter directory;
    ``weight_dtype`` (e.g. torch.bfloat16) stores floating weights compactly."""
    from safetensors.torch import save_file

    if getattr(heads, "kind", None) not in head_classes():
        raise CheckpointError(f"save_drafter takes MedusaHeads, HydraHeads or EagleHead, got {type(heads).__name__} "
                              "(save a draft LanguageModel with model.save(dir) instead)")
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for name, tensor in heads.state_dict().items():
        tensor = tensor.detach()
        if weight_dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(weight_dtype)
        tensors[name] = tensor.contiguous().cpu()
    meta = {"format": FORMAT, "kind": heads.kind, "config": heads.config_dict(),
            "target": {"hidden_size": heads.hidden_size, "vocab_size": heads.vocab_size}}
    weights = os.path.join(directory, DRAFTER_WEIGHTS)
    save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    config = os.path.join(directory, DRAFTER_CONFIG)
    with open(config + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(json.dumps(meta, indent=2) + "\n")
    os.replace(config + ".tmp", config)
    vocab_path = os.path.join(directory, DRAFT_VOCAB)
    if getattr(heads, "draft_vocab", None) is not None:
        save_draft_vocab(heads.draft_vocab, directory)
    elif os.path.exists(vocab_path):  # a stale file would restrict the new heads
        os.remove(vocab_path)


def save_draft_vocab(token_ids, directory: str) -> str:
    """Write ``token_ids`` (the draft vocabulary, see the module docstring) as
    ``directory/draft_vocab.safetensors``; returns the path."""
    from safetensors.torch import save_file

    ids = torch.as_tensor(token_ids).long().sort().values.contiguous().cpu()
    if ids.dim() != 1 or ids.numel() == 0 or bool((ids[1:] == ids[:-1]).any()) or int(ids[0]) < 0:
        raise CheckpointError(f"a draft vocabulary is a non-empty 1-D set of distinct token ids >= 0, got "
                              f"{ids.numel()} ids of shape {tuple(ids.shape)}")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, DRAFT_VOCAB)
    save_file({"token_ids": ids.to(torch.int32)}, path + ".tmp", metadata={"format": "pt"})
    os.replace(path + ".tmp", path)
    return path


def read_draft_vocab(directory: str) -> torch.Tensor | None:
    """The draft vocabulary in ``directory`` (long token ids), or None without the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, DRAFT_VOCAB)
    if not os.path.isfile(path):
        return None
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    ids = tensors.get("token_ids")
    if ids is None or ids.dim() != 1 or ids.is_floating_point():
        raise CheckpointError(f"{path} must hold one 1-D integer tensor 'token_ids' (found {sorted(tensors)}); "
                              "regenerate it with nimblelm.training.train_drafter.write_draft_vocab")
    return ids.long()


def drafter_dir(path_or_name: str, kind: str) -> str:
    """The drafter directory for a drafter path, or a model path / name with ``drafters/<kind>/``."""
    if kind not in KINDS:
        raise CheckpointError(f"unknown drafter kind {kind!r}; choose one of: {', '.join(KINDS)}")
    marker = "config.json" if kind == "sps" else DRAFTER_CONFIG
    path = path_or_name
    if not os.path.isdir(path):
        try:
            from .models.checkpoint import resolve_model_path
        except ImportError:  # older checkouts: a path only
            resolve_model_path = None
        if resolve_model_path is not None:
            path = resolve_model_path(path_or_name)
    nested = os.path.join(path, "drafters", kind)
    # a shipped model's name means its drafters/<kind>/ only (its own directory is the target)
    candidates = (nested, path) if os.path.isdir(path_or_name) else (nested,)
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, marker)):
            return candidate
    if kind == "sps" and os.path.isfile(os.path.join(path, DRAFTER_CONFIG)):
        raise CheckpointError(f"{path} holds draft heads, not a draft LM; pass the heads' kind instead of 'sps'")
    raise CheckpointError(f"no {kind} drafter at {path_or_name!r}: expected {os.path.join(path, marker)} or "
                          f"{os.path.join(nested, marker)} (train one with `nimblelm train drafter --kind {kind}`)")


def load_drafter(path_or_name: str, kind: str, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a drafter: heads (MedusaHeads / HydraHeads / EagleHead) for kind medusa / hydra /
    eagle, to pass as ``drafter=`` with the matching strategy (an EagleHead serves both
    ``eagle`` and ``eagle2``); a DraftModelDrafter for kind sps."""
    directory = drafter_dir(path_or_name, kind)
    if kind == "sps":
        from .generation.speculative.drafters import DraftModelDrafter
        from .models.checkpoint import load_model

        return DraftModelDrafter(load_model(directory, dtype=dtype, device=device))
    meta = _read_meta(directory, kind)
    heads = _build(meta, directory)
    tensors = _read_weights(directory)
    try:
        missing, unexpected = heads.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{directory}: weights do not fit {DRAFTER_CONFIG} "
                              f"({str(exc).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise CheckpointError(f"{directory}: weights do not fit {DRAFTER_CONFIG}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    _attach_draft_vocab(heads, directory)
    return heads.to(device=device, dtype=dtype).eval()


def _attach_draft_vocab(heads: torch.nn.Module, directory: str) -> None:
    ids = read_draft_vocab(directory)
    if ids is None:
        return
    if not hasattr(heads, "set_draft_vocab"):
        raise CheckpointError(f"{os.path.join(directory, DRAFT_VOCAB)}: {heads.kind} heads do not support a draft "
                              "vocabulary (only EAGLE does); remove the file")
    try:
        heads.set_draft_vocab(ids)
    except GenerationError as exc:
        raise CheckpointError(f"{os.path.join(directory, DRAFT_VOCAB)}: {exc}") from None


def _read_meta(directory: str, kind: str) -> dict:
    path = os.path.join(directory, DRAFTER_CONFIG)
    try:
        with open(path, encoding="utf-8") as fh:
            meta = json.load(fh)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg}); regenerate the drafter") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a nimblelm drafter config (format {FORMAT!r} expected)")
    if meta.get("kind") != kind:
        raise CheckpointError(f"{directory} holds a {meta.get('kind')!r} drafter, not {kind!r}; "
                              f"call load_drafter(..., kind={meta.get('kind')!r})")
    target = meta.get("target")
    if not isinstance(target, dict) or not all(isinstance(target.get(k), int) for k in ("hidden_size", "vocab_size")):
        raise CheckpointError(f"{path} must record the target's hidden_size and vocab_size under 'target'")
    return meta


def _build(meta: dict, directory: str) -> torch.nn.Module:
    cls = head_classes()[meta["kind"]]
    options = meta.get("config") or {}
    try:
        return cls(meta["target"]["hidden_size"], meta["target"]["vocab_size"], **options)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{os.path.join(directory, DRAFTER_CONFIG)}: invalid {meta['kind']} options "
                              f"{options} ({exc})") from None


def _read_weights(directory: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, DRAFTER_WEIGHTS)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing; a drafter needs {DRAFTER_CONFIG} and {DRAFTER_WEIGHTS}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
