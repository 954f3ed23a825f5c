"""The ``skillhub`` command line: the only package that prints, prompts, exits, or imports
click and rich. Each command parses its options, makes one library call and renders the
result; the commands of one group share a module (``pack_commands``, ``registry_commands``,
``hub_commands``, ``routing_commands``, ``graft_commands``, ``serve_commands``, ``other_commands``), options are declared once (``options``), rendering
lives in ``output`` and error lines in ``errors``.

Layer 7: imports anything below.
"""

from skillhub.cli import (  # noqa: F401  (register the commands)
    graft_commands, hub_commands, other_commands, pack_commands, registry_commands, routing_commands, serve_commands)
from skillhub.cli.app import main

__all__ = ["main"]
