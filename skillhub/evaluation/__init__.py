"""Measuring a lineage: scoring at every addition (``forgetting``) and the compression benchmark
(``benchmark``).

Layer 6: imports routing and sharing and everything below. What it measures with, and what the
layers below need too (eval sets, exact match, perplexity, ACC/BWT/FWT, pack interference), is
:mod:`skillhub.scoring`, layer 4.
"""
