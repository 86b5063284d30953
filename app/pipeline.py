"""The one path every transport takes into the models: look up, check, batch, run.

It knows no transport and does no I/O of its own; the transports decode payloads into tensors
(or, later, studies and records) and encode what comes back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from app.inference.batcher import BatcherPool, Tensors
from app.inference.registry import ModelRegistry, ServedVersion
from app.inference.tensors import check_inputs


@dataclass(frozen=True, slots=True)
class TensorResult:
    """The outputs of one request and the exact version that produced them."""

    served: ServedVersion
    outputs: Tensors


class Pipeline:
    def __init__(self, registry: ModelRegistry, batchers: BatcherPool) -> None:
        self.registry = registry
        self.batchers = batchers

    async def infer_tensors(
        self,
        model: str,
        version: str | None,
        inputs: Mapping[str, npt.NDArray[np.generic]],
        deadline: float | None,
    ) -> TensorResult:
        """Run raw tensors through the batcher of the version serving now.

        The version is resolved once, so a reload during the request cannot mix versions.
        """
        served = self.registry.get(model, version)
        tensors = check_inputs(served.spec, inputs)
        outputs = await self.batchers.get(served).infer(tensors, deadline)
        return TensorResult(served=served, outputs=outputs)

    def retire_unserved(self) -> None:
        """After a reload or unload: drain and stop the batchers of versions that left service."""
        self.batchers.retire_unserved(self.registry.all_served())
