"""``python -m stream_service.cli``: the same as the ``stream-service`` command."""

from stream_service.cli import main

main()
