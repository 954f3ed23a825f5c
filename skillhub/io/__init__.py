"""Bytes in and out: safetensors files read and written one tensor at a time (``tensorfile``),
Hugging Face checkpoints and their fingerprints (``checkpoint``), where skillhub may write
and how outputs are staged (``outputs``), bounded JSON from outside (``jsonio``), and the
Hugging Face Hub transport (``hub``, the only module importing huggingface_hub).

Layer 1: imports only skillhub.errors, skillhub.config and skillhub.progress.
"""
