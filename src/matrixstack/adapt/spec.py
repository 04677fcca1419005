"""What a tune job is asked to do (`TuneSpec`), stored as its row's config JSON; no behaviour here.

`total_steps(rows)`: `steps` when given, else `epochs` passes over the training rows in batches of `batch_size`
(the last batch of an epoch may be smaller).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_LEN_DEFAULT = 512  # tokens per example (prompt + answer); longer ones are cut


class TuneSpec(BaseModel):
    """A fine-tuning job's settings: base arch, dataset, LoRA shape, schedule, devices and the adapter's name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str = Field(description="arch name of the base model (its weights: packaged or `model add`ed)")
    dataset: str = Field(description="dataset name (adapt/datasets.py), the tenant's own")
    method: Literal["lora"] = "lora"
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = Field(description="PEFT module names, e.g. q_proj, k_proj, v_proj, o_proj")
    steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(8, ge=1)
    seed: int = 0
    checkpoint_every: int = Field(50, ge=1)
    devices: int = Field(1, ge=1)
    max_len: int = Field(MAX_LEN_DEFAULT, ge=2)
    out: str = Field(description="adapter name: the folder adapters/OUT in the data directory")

    @model_validator(mode="after")
    def _schedule(self) -> TuneSpec:
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("give exactly one of --steps S or --epochs E")
        if self.batch_size < self.devices:
            raise ValueError(
                f"--batch-size {self.batch_size} is below --devices {self.devices}: each device needs at least one "
                "example per step; raise the batch size or use fewer devices"
            )
        return self

    def total_steps(self, rows: int) -> int:
        """Return the optimizer steps of the job over `rows` training examples."""
        return self.steps if self.steps is not None else self.epochs * math.ceil(rows / self.batch_size)
