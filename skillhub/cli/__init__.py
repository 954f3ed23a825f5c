"""The ``skillhub`` command line: the only package that prints, prompts, exits, or imports
click and rich.

Layer 7: imports anything below.
"""

from skillhub.cli.main import main

__all__ = ["main"]
