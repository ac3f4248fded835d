#!/usr/bin/env python3
"""Build a PrefixKV engine: calibrate (or load) a profile, export, build and validate.

    python scripts/build_engine.py --model smollm2-135m --calibrate --keep 0.2 --output engines/smollm2-k20

Same as `prefixkv build`; see `--help` for every option.
"""
import sys

from prefixkv.cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
