"""Measuring: eval sets (``datasets``), exact match and perplexity (``scoring``), ACC / BWT /
FWT / forgetting (``metrics``), scoring at every addition (``forgetting``) and the
compression benchmark (``benchmark``).

Layers: datasets, scoring and metrics are layer 4 (they need no registry); forgetting and
benchmark are layer 6.
"""
