"""The ``prefixkv`` command: argument parsing only; each area registers its own subcommands.

    prefixkv calibrate   calibrate a retention profile           (prefixkv.commands)
    prefixkv eval        PPL / ROUGE-L of a method on a data set (prefixkv.commands)
    prefixkv bench       quality and speed benchmarks            (prefixkv.commands)
    prefixkv build       export + build + validate an engine     (prefixkv.exporter.commands)
    prefixkv generate    run an engine                           (prefixkv.exporter.commands)
    prefixkv validate    engine against the PyTorch reference    (prefixkv.exporter.commands)
    prefixkv deploy      write a Triton model repository         (prefixkv.serving.commands)
    prefixkv serve       start Triton on a repository            (prefixkv.serving.commands)

User errors (bad input, missing files, missing optional packages) print one line,
``error: ...``, and exit 2; set PREFIXKV_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = (
    "prefixkv.commands",
    "prefixkv.exporter.commands",
    "prefixkv.serving.commands",
    "prefixkv.plugins.commands",
    "prefixkv.vision.commands",
)


class UserError(Exception):
    """An error the user can fix; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="prefixkv",
        description="PrefixKV-compressed KV caches for Hugging Face LLMs: calibrate, export, build, validate, serve.",
    )
    parser.add_argument("--version", action="version", version=f"prefixkv {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name or (err.name and name.startswith(err.name + ".")):
                continue  # that area is not in this build
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, FileNotFoundError, FileExistsError, ImportError, NotImplementedError) as err:
        if os.environ.get("PREFIXKV_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
