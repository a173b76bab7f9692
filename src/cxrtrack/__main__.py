"""``python -m cxrtrack train ...``: the same as the ``cxrtrack`` command."""

from cxrtrack.console import main

main()
