"""The `opie` command line: the composition root that wires the packages together.

Each command family lives in its own module here (`cli/isu.py`, `cli/ca.py`,
`cli/lab.py`, ...) exposing ``register(subparsers)``; `cli.main` collects them.
"""
