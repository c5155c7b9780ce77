"""Reading the files the library loads (safetensors masks and checkpoints, JSON side files):
one error type for a bad file, a ``ValueError`` naming the file and what is wrong.

A missing file stays a ``FileNotFoundError``; anything that exists but cannot be read as what
it should be — empty, truncated, corrupted, not safetensors, not JSON — is a ``ValueError``
``"<path>: <what is wrong>"``. Nothing here runs pickled code: safetensors and JSON only.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch


def bad_file(path: str | os.PathLike, why: str) -> ValueError:
    return ValueError(f"{os.fspath(path)}: {why}")


def _exists(path: str | os.PathLike, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} not found")
    if not os.path.isfile(path):
        raise bad_file(path, f"is not a file (a {what} must be a safetensors file)")
    return path


def read_safetensors(path: str | os.PathLike, device: torch.device | str = "cpu",
                     what: str = "safetensors file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; ``ValueError`` naming ``path`` for an
    empty, truncated, corrupted or non-safetensors file (``FileNotFoundError`` if absent)."""
    from safetensors import safe_open

    path = _exists(path, what)
    if os.path.getsize(path) == 0:
        raise bad_file(path, f"is empty (0 bytes), not a {what}")
    try:
        with safe_open(path, framework="pt", device=str(device)) as fh:
            meta = dict(fh.metadata() or {})
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
    except (OSError, MemoryError) as exc:
        raise bad_file(path, f"cannot be read ({exc})") from exc
    except Exception as exc:  # safetensors' SafetensorError (truncated, bad header, ...)
        raise bad_file(path, f"is not a valid {what} (truncated, corrupted or another format: "
                             f"{type(exc).__name__}: {exc})") from exc
    return tensors, meta


def safetensors_metadata(path: str | os.PathLike, what: str = "safetensors file") -> dict[str, str]:
    """The metadata of a safetensors file (read without loading its tensors); errors as
    :func:`read_safetensors`."""
    from safetensors import safe_open

    path = _exists(path, what)
    try:
        with safe_open(path, framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (OSError, MemoryError) as exc:
        raise bad_file(path, f"cannot be read ({exc})") from exc
    except Exception as exc:
        raise bad_file(path, f"is not a valid {what} (truncated, corrupted or another format: "
                             f"{type(exc).__name__}: {exc})") from exc


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The parsed JSON of ``path``; ``ValueError`` naming it when it is not UTF-8 JSON."""
    path = _exists(path, what)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_file(path, f"is not valid JSON ({exc}); the {what} is broken") from exc


def json_field(metadata: dict[str, str], key: str, path: str | os.PathLike, kind: type) -> Any:
    """``json.loads(metadata[key])`` checked to be a ``kind``; ``ValueError`` naming the file."""
    try:
        value = json.loads(metadata[key])
    except (json.JSONDecodeError, TypeError) as exc:
        raise bad_file(path, f"metadata {key!r} is not valid JSON ({exc})") from exc
    if not isinstance(value, kind):
        raise bad_file(path, f"metadata {key!r} must be a JSON {kind.__name__}, got {type(value).__name__}")
    return value
