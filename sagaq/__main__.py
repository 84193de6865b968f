"""``python -m sagaq`` is the ``sagaq`` command."""

from sagaq.cli import main

main(prog_name="sagaq")
