"""``python -m ovseg`` is the ``ovseg`` command."""

from ovseg.cli import main

main()
