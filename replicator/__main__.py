"""``python -m replicator`` is the ``replicator`` command."""

from .cli import main

main()
