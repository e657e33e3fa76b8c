"""The `toolkit` subcommands (toolkit/cli.py): one module each, its options and `main(argv)` over the library."""
