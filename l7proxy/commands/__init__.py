"""CLI subcommands. Each module here defines `register(subparsers)`; cli.py discovers them."""
