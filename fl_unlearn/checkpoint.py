"""Checkpoints: safetensors weights plus a JSON config beside them, both written atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fl_unlearn.io import atomic_path, write_json_atomic


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``path`` (.safetensors) and ``path.json``; the JSON is written last, so its presence marks completion."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(path.with_suffix(".json"), config)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    meta = path.with_suffix(".json")
    if not path.is_file() or not meta.is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete or missing (needs {path.name} and {meta.name})")
    return load_file(str(path)), json.loads(meta.read_text())
