"""``python -m mmsb``: the ``mmsb`` command."""

from .cli import main

main(prog_name="mmsb")
