"""``python -m ovseg`` is the ``ovseg`` command."""

from ovseg.command import main

main()
