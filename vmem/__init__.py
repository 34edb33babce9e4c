"""``vmem``: the command line. Every subcommand is a module here with ``main(argv) -> int``.

The command table and the one runner live in `vmem.main`; `vmem.args` holds what every command shares.
"""
