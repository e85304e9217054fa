"""The memory model's sizes: decoder-only architectures by tensor counts, and the per-rank terms of a
learned merge (the formulas are in ``benchmarks.memory_model``'s docstring)."""

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Architecture:
    """A decoder-only transformer's tensor sizes (enough to count what the memory model needs).

    Args:
        name: Label for the table.
        hidden: Hidden size.
        layers: Number of repeated blocks.
        intermediate: MLP inner size (gated MLP: three matrices).
        vocab: Vocabulary rows of the embedding (and LM head).
        kv_dim: Width of the key and value projections (heads_kv x head_dim).
        tied: Whether the LM head is the embedding.
        qkv_bias: Whether q, k, v carry biases (Qwen2).
    """

    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    kv_dim: int
    tied: bool
    qkv_bias: bool = False

    @property
    def block(self) -> int:
        """Parameters of one block: attention, gated MLP, two norms."""
        h, kv = self.hidden, self.kv_dim
        attention = 2 * h * h + 2 * h * kv + ((h + 2 * kv) if self.qkv_bias else 0)
        return attention + 3 * h * self.intermediate + 2 * h

    @property
    def outside(self) -> int:
        """Parameters outside the blocks: embedding, untied LM head, final norm."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        """All parameters."""
        return self.layers * self.block + self.outside

    @property
    def largest(self) -> int:
        """The largest single tensor (the embedding or an MLP matrix)."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


ARCHITECTURES = {
    "smollm2-135m": Architecture("SmolLM2-135M", 576, 30, 1536, 49152, 192, tied=True),
    "qwen2.5-0.5b": Architecture("Qwen2.5-0.5B", 896, 24, 4864, 151936, 128, tied=True, qkv_bias=True),
    "llama-2-7b": Architecture("Llama-2-7B", 4096, 32, 11008, 32000, 4096, tied=False),
    "llama-3-70b": Architecture("Llama-3-70B", 8192, 80, 28672, 128256, 1024, tied=False),
}


def per_rank_bytes(
    arch: Architecture,
    experts: int,
    ranks: int,
    storage_bytes: int,
    mode: str,
    activations: float,
    start: bool = False,
    compute_bytes: int = 2,
) -> dict[str, float]:
    """The memory model's terms for one rank, in bytes (see the module docstring).

    Args:
        arch: The experts' architecture.
        experts: T, the number of merged experts.
        ranks: N, the ranks sharing the stored tensors.
        storage_bytes: s, bytes per stored element (base and task vectors).
        mode: ``whole`` or ``per_block``.
        activations: A, activations and overhead per rank, bytes.
        start: Whether a start merge is stored (``model.start_from``).
        compute_bytes: c, bytes per element of the compute dtype (2: bf16-mixed; 4: float32).

    Returns:
        ``stored``, ``transient`` (merged tensors, their gradient and float32 merges), ``activations``,
        ``total``, and the host RAM while loading: ``load`` (sharded loading), ``load_whole``.
    """
    if mode not in ("whole", "per_block"):
        raise ValueError(f"mode must be 'whole' or 'per_block', not {mode!r}")
    p = arch.params
    stored = (4 * (1 + int(start)) + experts * storage_bytes) * p / ranks
    gathered = 8 * arch.largest
    blocks = 8 * arch.outside + (2 * compute_bytes + 8) * arch.block  # the outside tensors, one block
    transient = (8 * p if mode == "whole" else blocks) + gathered
    return {
        "stored": stored,
        "transient": transient,
        "activations": activations,
        "total": stored + transient + activations,
        "load": stored + (4 * arch.largest + storage_bytes * p) / ranks,
        "load_whole": 8 * p + experts * storage_bytes * p,
    }
