"""The ``prefixkv`` command: argument parsing only; each command builds its configs and calls the library.

    prefixkv calibrate   calibrate a retention profile               (cli.core)
    prefixkv eval        PPL / ROUGE-L of a method on a data set     (cli.core)
    prefixkv profile     import the released PrefixKV profiles       (cli.core)
    prefixkv tune        the best candidate for a model and its data, as a profile  (cli.tune)
    prefixkv bench       quality, speed and scoring benchmarks       (cli.bench)
    prefixkv build       calibrate or load a profile, export, build and validate an engine  (cli.engine)
    prefixkv generate    run an engine                               (cli.engine)
    prefixkv validate    an engine against the PyTorch reference     (cli.engine)
    prefixkv deploy      write a Triton model repository             (cli.serving)
    prefixkv serve       start Triton on a repository                (cli.serving)

Text and vision-language models take the same commands: given a LLaVA model (or a vision
engine), they take images.  ``prefixkv vision STAGE ...`` is the same as ``prefixkv STAGE ...``.
Every flag is defined once, in ``cli.args``.

User errors (bad input, missing files, missing optional packages) print one line,
``error: ...``, and exit 2; set PREFIXKV_DEBUG=1 for the traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from . import bench, core, engine, serving, tune
from .args import UserError

COMMANDS = (core, tune, engine, serving, bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixkv",
        description="PrefixKV-compressed KV caches for Hugging Face LLMs and VLMs: calibrate, export, build, validate, serve.",
    )
    parser.add_argument("--version", action="version", version=f"prefixkv {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["vision"]:  # the former `prefixkv vision STAGE`: the same commands
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # the command line, for the results that record it
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


__all__ = ["UserError", "build_parser", "main"]
