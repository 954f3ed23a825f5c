"""The embedded default: synthetic tasks and tiny models (``synthetic``), fine-tuning
(``train``) and the three-task story (``run``).

Layer 7: imports anything below.
"""
