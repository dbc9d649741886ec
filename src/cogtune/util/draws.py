"""The random numbers of a training step, drawn so that a sample's numbers never depend on how the
global batch is shared among processes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Draws:
    """The random numbers of one global batch, drawn in full on every process from the batch's
    generator, of which a process keeps the rows of its own samples: each sample gets the same
    noise whether the global batch is trained by one process or shared among several."""

    generator: torch.Generator
    start: int = 0  # this process's first row in the global batch
    total: int | None = None  # real samples of the global batch (None: this process's batch is all of it)

    def keep(self, drawn: torch.Tensor, rows: int) -> torch.Tensor:
        """This process's rows; rows past the global batch's real samples (repeats of weight zero,
        see train.data.Share) get the first row's numbers, which nothing uses."""
        kept = drawn[self.start:self.start + rows]
        if len(kept) < rows:
            kept = torch.cat([kept, drawn[:1].expand(rows - len(kept), *drawn.shape[1:])])
        return kept

    def randn(self, shape) -> torch.Tensor:
        return self.keep(torch.randn((self.total or shape[0], *shape[1:]), generator=self.generator), shape[0])

    def randint(self, high: int, rows: int) -> torch.Tensor:
        return self.keep(torch.randint(0, high, (self.total or rows,), generator=self.generator), rows)

    def rand(self, rows: int) -> torch.Tensor:
        return self.keep(torch.rand(self.total or rows, generator=self.generator), rows)
