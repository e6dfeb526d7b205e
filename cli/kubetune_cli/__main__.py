"""``python -m kubetune_cli``: the same as the ``kubetune`` command."""

from kubetune_cli.main import main

main()
