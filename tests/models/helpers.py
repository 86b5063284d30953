"""Helpers for the reference-model tests (tests/models)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / "models"


def load_model_toml(name: str) -> dict[str, Any]:
    with (MODELS_DIR / name / "model.toml").open("rb") as fh:
        return tomllib.load(fh)


def ort_session(path: Path):
    """A CPU-only ONNX Runtime session (deterministic; no CUDA needed or probed)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
