"""Benchmarks: quality (PPL, ROUGE-L, retrieval), speed (engine vs PyTorch) and scoring (calibration prefill cost).

    quality.py   every method and (scorer, allocation) pair at several keep fractions, paired intervals
    speed.py     one engine family (keep 1.0 / 0.5 / 0.2) against the PyTorch reference
    scoring.py   the calibration prefill's overhead per scorer
    tasks.py     the long-context retrieval task, generated from the built-in text
    stats.py     paired bootstrap confidence intervals

The runtime never imports this package, and ``prefixkv deploy`` does not vendor it.
"""
