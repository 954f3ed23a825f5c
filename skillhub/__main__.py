"""``python -m skillhub``: the command line."""

from skillhub.cli import main

main()
