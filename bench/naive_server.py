"""A deliberately naive inference endpoint: the baseline that ``bench/engine.py`` compares medinfer with.

What a typical first FastAPI wrapper around an ONNX model looks like: one ``session.run`` per
request (no batching), the image sent as nested JSON lists and validated by pydantic, a plain
``def`` route that FastAPI runs in its thread pool. ``/predict_b64`` is the same with the tensor
as base64 of little-endian FP32 instead of lists.

Run (the engine does this itself)::

    NAIVE_MODEL_PATH=models/cxr-pneumonia/2/model.onnx \\
        .venv/bin/python -m uvicorn bench.naive_server:app --host 127.0.0.1 --port 8100
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

_session = ort.InferenceSession(Path(os.environ["NAIVE_MODEL_PATH"]).read_bytes(), providers=["CPUExecutionProvider"])
_input = _session.get_inputs()[0].name

app = FastAPI()


class ImageRequest(BaseModel):
    image: list[list[list[float]]]


class Base64Request(BaseModel):
    image_b64: str
    shape: list[int]


class Prediction(BaseModel):
    probabilities: list[list[float]]


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/predict")
def predict(request: ImageRequest) -> Prediction:
    image = np.asarray(request.image, dtype=np.float32)[np.newaxis]
    (probabilities,) = _session.run(None, {_input: image})
    return Prediction(probabilities=probabilities.tolist())


@app.post("/predict_b64")
def predict_b64(request: Base64Request) -> Prediction:
    image = np.frombuffer(base64.b64decode(request.image_b64), dtype="<f4").reshape(request.shape)
    (probabilities,) = _session.run(None, {_input: image})
    return Prediction(probabilities=probabilities.tolist())
