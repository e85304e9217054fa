"""Cheap content digests of tensors that come out the same whether a tensor is read whole or in shards.

A digest covers the shape, the dtype, an exact checksum of every element (the sum of their bit patterns
as integers: associative, so shards' partial sums add up to the whole's exactly, in any order) and an
evenly strided sample of values. :func:`tensor_digest` digests a whole tensor; a rank holding only the
flat columns [lo, hi) computes :func:`partial_digest`, and :func:`combine_digest` of every rank's parts
gives the same string as :func:`tensor_digest` of the whole tensor. :func:`model_digest` and
:func:`set_fingerprint` assemble them into an expert set's fingerprint, the same way for both loaders.
"""

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

SAMPLES = 1024
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class DigestPart:
    """What one slice of a tensor contributes to its digest.

    Attributes:
        checksum: Sum of the slice's elements' bit patterns (as signed integers), exact.
        samples: Global flat index -> value of the sampled elements that lie in the slice.
    """

    checksum: int
    samples: dict[int, float]


def sample_step(numel: int) -> int:
    """Distance between sampled elements of a tensor of ``numel`` elements."""
    return max(1, numel // SAMPLES)


def partial_digest(flat: Tensor, lo: int, numel: int) -> DigestPart:
    """The digest contribution of the flat elements [lo, lo + len(flat)) of a tensor of ``numel`` elements.

    Args:
        flat: The slice, (hi - lo,), in the dtype the whole tensor is digested in.
        lo: Its first element's flat index in the whole tensor.
        numel: The whole tensor's number of elements.

    Returns:
        Its checksum and samples.
    """
    flat = flat.detach().reshape(-1).contiguous().cpu()
    ints = flat.view(_INT_VIEW[flat.element_size()])  # (n,) bit patterns
    checksum = int(ints.sum(dtype=torch.int64)) if flat.numel() else 0
    step = sample_step(numel)
    first = -(-lo // step) * step  # first sampled index >= lo
    last = min(lo + flat.numel(), step * SAMPLES)  # samples are indices k * step, k < SAMPLES
    picked = range(first, last, step)
    values = flat[first - lo : last - lo : step].to(torch.float64).tolist() if len(picked) else []
    return DigestPart(checksum, dict(zip(picked, values, strict=True)))


def combine_digest(shape: Sequence[int], dtype: torch.dtype, parts: Sequence[DigestPart]) -> str:
    """The digest of a tensor from the parts of slices that cover it exactly once.

    Args:
        shape: The whole tensor's shape.
        dtype: Its dtype.
        parts: One part per slice (any order).

    Returns:
        A 16-hex-digit digest.
    """
    checksum = sum(p.checksum for p in parts)
    samples = {i: v for p in parts for i, v in p.samples.items()}
    h = hashlib.sha256(f"{tuple(shape)}|{dtype}|{checksum}".encode())
    h.update(torch.tensor([samples[i] for i in sorted(samples)], dtype=torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


def tensor_digest(tensor: Tensor) -> str:
    """A cheap content digest of a whole tensor (see the module docstring)."""
    return combine_digest(tensor.shape, tensor.dtype, [partial_digest(tensor, 0, tensor.numel())])


def entry(name: str, digest: str) -> str:
    """One tensor's line in a model digest."""
    return f"{name}:{digest}|"


def model_digest(header: str, entries: Iterable[str]) -> str:
    """The digest (hex) of one model: a header, then its entries (``entry`` lines, in a fixed order)."""
    h = hashlib.sha256(header.encode())
    for line in entries:
        h.update(line.encode())
    return h.hexdigest()


def set_fingerprint(tasks: Sequence[str], experts: Sequence[str], base: str) -> tuple[str, list[str]]:
    """(fingerprint of the expert set, each task's digest of base + that expert), 16 hex digits each.

    Args:
        tasks: Task names, in order.
        experts: Each task's expert digest (``model_digest``).
        base: The base's digest (``model_digest`` with an empty header).
    """
    h = hashlib.sha256()
    for task, expert in zip(tasks, experts, strict=True):
        h.update(f"{task}|{expert}|".encode())
    h.update(bytes.fromhex(base))
    return h.hexdigest()[:16], [hashlib.sha256(f"{base}|{e}".encode()).hexdigest()[:16] for e in experts]


def factors_digest(factors: Mapping[str, tuple[Tensor, Tensor]]) -> str:
    """The part of an expert's digest that covers its plain LoRA factors (empty without any)."""
    return "".join(
        f"{m}@lora:{tensor_digest(a)}:{tensor_digest(b)}|" for m, (a, b) in sorted(factors.items())
    )
