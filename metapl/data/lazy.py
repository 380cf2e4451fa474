"""Images decoded on demand, for data sets too large to hold in memory (ImageNet)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["DecodedImages"]


class DecodedImages:
    """The images of ``dataset`` at ``indices``, decoded when a batch is asked for.

    ``images[idx]`` with an int64 tensor of positions (or a slice) returns uint8
    [len(idx), C, H, W] on the CPU, decoded by ``threads`` threads (PIL releases the GIL while
    decoding). It stands in for a uint8 tensor in ``metapl.training.SSLData``.
    """

    def __init__(self, dataset: Dataset, indices: np.ndarray | torch.Tensor, threads: int = 8):
        self.dataset = dataset
        self.indices = torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        self.pool = ThreadPoolExecutor(max_workers=threads)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: torch.Tensor | slice) -> torch.Tensor:
        positions = self.indices[key.cpu() if isinstance(key, torch.Tensor) else key]
        images = self.pool.map(lambda i: self.dataset[i][0], positions.tolist())
        return torch.stack(list(images))
