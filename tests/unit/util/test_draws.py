"""The draws of a step: each sample's numbers, whatever the number of processes."""

import torch

from cogtune.util.draws import Draws


def test_every_sample_gets_the_same_noise_whatever_the_process_count():
    def draws(start, total):
        return Draws(torch.Generator().manual_seed(5), start=start, total=total)

    whole = draws(0, None)
    alone = (whole.randn((4, 3)), whole.randint(1000, 4), whole.rand(4))
    for rows, starts in ((2, (0, 2)), (1, (0, 1, 2, 3))):
        parts = [draws(start, 4) for start in starts]
        shared = [(d.randn((rows, 3)), d.randint(1000, rows), d.rand(rows)) for d in parts]
        for kind in range(3):
            assert torch.equal(torch.cat([s[kind] for s in shared]), alone[kind])
    short = draws(2, 3)  # the second of two processes, batch 2, of a global batch of 3: one real row
    whole_of_three = draws(0, None)
    noise, reference = short.randn((2, 3)), whole_of_three.randn((3, 3))
    assert torch.equal(noise[0], reference[2]) and torch.isfinite(noise).all()  # the repeat's row counts for nothing
