"""Numeric kernels shared by operators, budget mode and the benchmark: bit packing
(``bitpack``), group-wise quantization and byte counts (``quantize``), GPTQ (``gptq``) and
truncated SVD (``svd``).

Layer 1: imports nothing of skillhub but the layer-0 modules; torch and numpy only.
"""
