"""What the benchmark scripts share: one parent argument parser (``cli``), one results writer
(``results``), memory probes and worker processes (``measure``), expert sets (``experts``), training
steps (``steps``: classification; ``lm_step``: causal LM) and the memory model's sizes (``architectures``).

No benchmark script imports another: what two of them use lives here.
"""
