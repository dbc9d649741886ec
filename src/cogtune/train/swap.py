"""CPU memory for the transformer's blocks: block swap, and checkpointed inputs offloaded.

Block swap (--blocks_to_swap N, musubi-tuner's option): the frozen weights of the last N
transformer blocks live in (pinned) CPU memory and come to the GPU only around the block's own
forward pass and, with gradient checkpointing, its recomputation and backward pass. The copy of
the next block is started on a side stream while the current one computes.

A swapped block's frozen parameters point at an empty tensor while the block is away, so any use
of a weight that is not resident fails at once instead of reading stale memory. The LoRA (trainable,
with its optimizer state) stays on the device.

Order of events, blocks 0..L-1 with the last N swapped:
- forward: before block i, block i is made resident (waiting for its prefetch) and block i+1 is
  prefetched; after block i, block i goes away (checkpointing kept none of its weights).
- backward (blocks in reverse): before block i is recomputed, block i is made resident, block i+1
  (whose backward is done) goes away and block i-1 is prefetched; block i stays until its backward
  has run, which follows its recomputation.
"""

from __future__ import annotations

import torch

from cogtune.errors import CogtuneError


def in_backward() -> bool:
    """Whether autograd is running a backward pass now (a checkpointed block's recomputation)."""
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    def __init__(self, blocks: torch.nn.ModuleList, count: int, device: torch.device):
        if not 0 < count < len(blocks):
            raise CogtuneError(f"--blocks_to_swap {count}: the transformer has {len(blocks)} blocks; swap 1 to "
                               f"{len(blocks) - 1} of them.")
        self.blocks, self.device = blocks, device
        self.first = len(blocks) - count  # blocks first..L-1 are swapped
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.events: dict[int, torch.cuda.Event | None] = {}
        self.loads = 0  # copies to the device (the tests count them)
        self.frozen = {i: self._tensors(i) for i in range(self.first, len(blocks))}
        # The home copy of each swapped tensor: pinned CPU memory on a GPU machine. Made before the
        # model moves to the device, so that the swapped blocks never need room there all at once.
        self.home = {id(t): (t.data.to("cpu").pin_memory() if cuda else t.data.clone()) for i in self.frozen
                     for t in self.frozen[i]}
        self.resident = set(self.frozen)
        for i in self.frozen:
            self._away(i)
        self.handles = []
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._before(i)))
            self.handles.append(block.register_forward_hook(self._after(i)))

    def _tensors(self, i: int) -> list[torch.Tensor]:
        block = self.blocks[i]
        return [p for p in block.parameters() if not p.requires_grad] + list(block.buffers())

    def _away(self, i: int) -> None:
        """Drop block i's copy on the device (its home copy stays)."""
        if i not in self.resident:
            return
        for t in self.frozen[i]:
            if t.data.is_cuda:  # used on the compute stream: its memory is not reused before that work is done
                t.data.record_stream(torch.cuda.current_stream(self.device))
            t.data = torch.empty(0, dtype=t.dtype, device=self.device)
        self.resident.discard(i)
        self.events.pop(i, None)

    def _fetch(self, i: int) -> None:
        """Start copying block i to the device (on the side stream on a GPU)."""
        if i not in self.frozen or i in self.resident:  # (not a swapped block, or there already)
            return
        if self.stream is None:
            for t in self.frozen[i]:
                t.data = self.home[id(t)].to(self.device, copy=True)
            self.events[i] = None
        else:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # after the work that freed memory
            with torch.cuda.stream(self.stream):
                for t in self.frozen[i]:
                    t.data = self.home[id(t)].to(self.device, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self.stream)
            self.events[i] = event
        self.resident.add(i)
        self.loads += 1

    def _ready(self, i: int) -> None:
        """Block i is resident and its copy is done, as far as the compute stream is concerned."""
        self._fetch(i)
        event = self.events.get(i)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            self.events[i] = None

    def _before(self, i: int):
        def hook(module, args):
            self._ready(i)
            if in_backward():  # recomputing block i: block i+1's backward is done
                self._away(i + 1)
                self._fetch(i - 1)
            else:
                self._fetch(i + 1)
        return hook

    def _after(self, i: int):
        def hook(module, args, output):
            if not in_backward():  # its backward (after a recomputation) needs it again later
                self._away(i)
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def swapped_bytes(blocks: torch.nn.ModuleList, count: int) -> tuple[int, int]:
    """(bytes of the swapped blocks' frozen tensors, bytes of the two largest of them): what leaves the
    device, and what is on it at most at once (the block computing and the one being fetched)."""
    sizes = sorted((sum(t.numel() * t.element_size() for t in [*b.parameters(), *b.buffers()] if not t.requires_grad)
                    for b in list(blocks)[len(blocks) - count:]), reverse=True)
    return sum(sizes), sum(sizes[:2])


class OffloadedCheckpointing:
    """--gradient_checkpointing_cpu_offload (musubi-tuner's name): gradient checkpointing whose
    stored block inputs (hidden states and text states, the big per-block tensors) wait in pinned CPU
    memory for the backward pass instead of on the GPU. The forward pass computes on the inputs it
    has; the recomputation brings its copy back. Given to diffusers' enable_gradient_checkpointing."""

    def __init__(self, device: torch.device, offloaded: int):
        self.device = device
        self.offloaded = offloaded  # the block's first arguments that are its big states (the family says)
        self.bytes = 0  # bytes sent to CPU memory since the last reset (the tests and the estimate check)

    def __call__(self, module, *args):
        from torch.utils.checkpoint import checkpoint

        stored = tuple(self._to_host(a) if i < self.offloaded and isinstance(a, torch.Tensor) else a
                       for i, a in enumerate(args))
        needs_grad = [isinstance(a, torch.Tensor) and a.requires_grad for a in args]
        forward_inputs = [args]  # dropped once the forward pass is done: only the CPU copies stay

        def run(*inputs):
            if in_backward():  # the recomputation: the stored copies come back, needing grad as the inputs did
                inputs = tuple(x.to(self.device, non_blocking=True).requires_grad_(needs_grad[i])
                               if i < self.offloaded and isinstance(x, torch.Tensor) else x
                               for i, x in enumerate(inputs))
            else:  # the forward pass: the inputs themselves (their graph carries the gradients)
                inputs = forward_inputs[0]
            return module(*inputs)

        try:
            return checkpoint(run, *stored, use_reentrant=False)
        finally:
            forward_inputs[0] = None

    def _to_host(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes += t.numel() * t.element_size()
        t = t.detach()
        if t.is_cuda:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
        return t.to("cpu", copy=True)
