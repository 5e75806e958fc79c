"""``python -m snapferry.workers.cli``: the same as the ``snapferry`` command."""

from . import main

main()
