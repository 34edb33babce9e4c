"""``vmem``: the command line. Every subcommand is a module here with ``main(argv) -> int``.

`vmem.main` lists them in one table and dispatches; `vmem.args` holds the one runner every command's
``main`` goes through (exit 0 ok, 1 runtime failure, 2 bad flag) and what every command shares.
"""
