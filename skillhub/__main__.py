"""``python -m skillhub`` is the ``skillhub`` command."""

from skillhub.cli import main

main()
