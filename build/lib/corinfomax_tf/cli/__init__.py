"""Command entry points: flags -> a frozen, validated config -> library code.

Each module defines its command's flags and a `main(flags)` that builds the config
and calls the library; `runner.run` is the one way every command starts and fails.
Commands never import other commands.
"""
