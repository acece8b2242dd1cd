"""Per-rank RNG states in a checkpoint: capture, restore, and the JSON file they are kept in (no pickle)."""

from __future__ import annotations

import base64
import json
import os
import random
from typing import Any

import numpy as np
import torch

from crlft import manifest
from crlft.errors import UserError


def rng_state() -> dict[str, Any]:
    """This process's Python, numpy and torch (CPU and CUDA) RNG states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states from :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_state_to_json(state: dict[str, Any]) -> dict[str, Any]:
    """:func:`rng_state` as JSON-able data (torch's byte states in base64)."""
    py_version, py_internal, py_gauss = state["python"]
    np_name, np_keys, np_pos, np_has_gauss, np_cached = state["numpy"]

    def b64(t: torch.Tensor) -> str:
        return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")

    return {
        "python": [py_version, list(py_internal), py_gauss],
        "numpy": [np_name, np_keys.tolist(), int(np_pos), int(np_has_gauss), float(np_cached)],
        "torch": b64(state["torch"]),
        "cuda": None if state.get("cuda") is None else [b64(t) for t in state["cuda"]],
    }


def rng_state_from_json(data: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`rng_state_to_json`."""

    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    py_version, py_internal, py_gauss = data["python"]
    np_name, np_keys, np_pos, np_has_gauss, np_cached = data["numpy"]
    return {
        "python": (py_version, tuple(py_internal), py_gauss),
        "numpy": (np_name, np.array(np_keys, dtype=np.uint32), np_pos, np_has_gauss, np_cached),
        "torch": tensor(data["torch"]),
        "cuda": None if data.get("cuda") is None else [tensor(t) for t in data["cuda"]],
    }


def rng_file(checkpoint: str, rank: int) -> str:
    return os.path.join(checkpoint, f"rng_state_rank{rank}.json")


def read_rng_file(checkpoint: str, rank: int) -> dict[str, Any] | None:
    """This rank's RNG states: JSON, or the ``.pt`` of crlft 0.1 loaded with ``weights_only=True`` (numpy allowed)."""
    path = rng_file(checkpoint, rank)
    try:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return rng_state_from_json(json.load(f))
        legacy = path[: -len(".json")] + ".pt"
        if os.path.isfile(legacy):
            return manifest.load_weights_only(legacy)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a crlft RNG state ({type(e).__name__}: {e})") from None
    return None


__all__ = ["read_rng_file", "rng_file", "rng_state", "rng_state_from_json", "rng_state_to_json", "set_rng_state"]
