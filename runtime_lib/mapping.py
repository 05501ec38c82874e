"""TensorRT-LLM's `Mapping`: where this rank sits in the tensor/pipeline-parallel grid."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mapping:
    world_size: int = 1
    rank: int = 0
    gpus_per_node: int = 8
    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size * self.pp_size != self.world_size:
            raise ValueError(f"world_size ({self.world_size}) must equal tp_size ({self.tp_size}) "
                             f"x pp_size ({self.pp_size})")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size - 1}], got {self.rank}")

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pp_size - 1
