#!/usr/bin/env python3
"""Benchmarks: `python scripts/benchmark.py quality [...]` or `python scripts/benchmark.py speed [...]`.

Same as `prefixkv bench quality|speed`; each writes JSON, a markdown table and plots.
"""
import sys

from prefixkv.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
