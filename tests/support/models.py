"""Small real ONNX models for tests that need a repository they can corrupt and reload.

The graphs are real (built with ``onnx.helper`` and run by ONNX Runtime); only their size is
small. The reference models in ``models/`` are tested separately in ``tests/models``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TOML = """\
name = "{name}"
task = "classification"
description = "Test model: softmax(x W + b)."
intended_use = "Automated tests of the medinfer service only."
not_for_clinical_use = true
labels = ["negative", "positive"]
positive_label = "positive"

[[inputs]]
name = "features"
datatype = "FP32"
shape = [-1, 3]

[[outputs]]
name = "probabilities"
datatype = "FP32"
shape = [-1, 2]

[thresholds]
default = 0.5

[batching]
max_batch_size = 8
max_queue_delay_ms = 1.0

[version_policy]
policy = "latest"
latest_n = {latest_n}

{versions}
"""


def linear_softmax_model(seed: int) -> bytes:
    """``softmax(x @ W + b)`` with weights drawn from ``seed``: distinct seeds, distinct outputs."""
    rng = np.random.default_rng(seed)
    weights = numpy_helper.from_array(rng.normal(size=(3, 2)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.normal(size=(2,)).astype(np.float32), "b")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "W"], ["logits_raw"]),
            helper.make_node("Add", ["logits_raw", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
        ],
        "linear_softmax",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        initializer=[weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_model(repo: Path, name: str, versions: dict[str, int], *, latest_n: int = 1) -> Path:
    """Write ``repo/name`` with one file per version (``{version: seed}``), sha256 pinned."""
    model_dir = repo / name
    blocks = []
    for version, seed in versions.items():
        data = linear_softmax_model(seed)
        (model_dir / version).mkdir(parents=True, exist_ok=True)
        (model_dir / version / "model.onnx").write_bytes(data)
        blocks.append(f'[versions.{version}]\nsha256 = "{hashlib.sha256(data).hexdigest()}"\n')
    (model_dir / "model.toml").write_text(
        TOML.format(name=name, latest_n=latest_n, versions="\n".join(blocks)), encoding="utf-8"
    )
    return model_dir


def corrupt(path: Path) -> None:
    """Flip one byte near the end of the file, as bit rot or tampering would."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _install(repo: Path, name: str, data: bytes, template: str, **fields: object) -> Path:
    """Write ``data`` as version 1 of ``name`` with ``template`` rendered and its sha256 pinned."""
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "1" / "model.onnx").write_bytes(data)
    text = template.format(name=name, sha=hashlib.sha256(data).hexdigest(), **fields)
    (model_dir / "model.toml").write_text(text, encoding="utf-8")
    return model_dir


GATHER_TOML = """\
name = "{name}"
task = "classification"
intended_use = "Automated tests: a model that fails inside ONNX Runtime on out-of-range indices."
not_for_clinical_use = true
labels = ["a", "b"]

[[inputs]]
name = "index"
datatype = "INT64"
shape = [-1, 1]

[[outputs]]
name = "value"
datatype = "FP32"
shape = [-1, 1]

[batching]
max_batch_size = 16
max_queue_delay_ms = {delay_ms}
max_queue_size = {queue_size}

[versions.1]
sha256 = "{sha}"
"""


def write_gather_model(repo: Path, name: str = "gather", *, delay_ms: float = 50.0, queue_size: int = 64) -> Path:
    """``value = table[index]`` over a 4-entry table: index 0-3 works, 10 makes ORT raise.

    The warm-up run (all zeros) succeeds, so the model loads; a request with a bad index fails
    its whole batch at run time, which is what the batcher's error path needs.
    """
    table = numpy_helper.from_array(np.array([10.0, 11.0, 12.0, 13.0], dtype=np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "index"], ["value"], axis=0)],
        "gather",
        [helper.make_tensor_value_info("index", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("value", TensorProto.FLOAT, ["batch", 1])],
        initializer=[table],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data = model.SerializeToString()
    return _install(repo, name, data, GATHER_TOML, delay_ms=delay_ms, queue_size=queue_size)


HEAVY_TOML = """\
name = "{name}"
task = "classification"
intended_use = "Automated tests: enough compute per row to keep the batcher busy."
not_for_clinical_use = true
labels = ["a", "b"]

[[inputs]]
name = "x"
datatype = "FP32"
shape = [-1, {width}]

[[outputs]]
name = "probabilities"
datatype = "FP32"
shape = [-1, 2]

[batching]
max_batch_size = 16
max_queue_delay_ms = 2.0
max_queue_size = 256

[versions.1]
sha256 = "{sha}"
"""


def write_heavy_model(repo: Path, name: str = "heavy", *, width: int = 1024, layers: int = 8) -> Path:
    """``layers`` dense ReLU layers of ``width``: about 2·width²·layers FLOPs per row."""
    rng = np.random.default_rng(0)
    nodes = []
    initializers = []
    current = "x"
    for i in range(layers):
        weight = numpy_helper.from_array((rng.normal(size=(width, width)) / np.sqrt(width)).astype(np.float32), f"w{i}")
        initializers.append(weight)
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Relu", [f"m{i}"], [f"r{i}"]))
        current = f"r{i}"
    head = numpy_helper.from_array(rng.normal(size=(width, 2)).astype(np.float32), "head")
    initializers.append(head)
    nodes.append(helper.make_node("MatMul", [current, "head"], ["logits"]))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _install(repo, name, model.SerializeToString(), HEAVY_TOML, width=width)
