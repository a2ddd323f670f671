"""Allow ``python -m gtp5g_op``."""

from gtp5g_op.cli import main

main()
