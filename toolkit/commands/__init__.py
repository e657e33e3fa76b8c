"""The `toolkit` subcommands: each module parses its options and calls the library (toolkit/cli.py runs them)."""
