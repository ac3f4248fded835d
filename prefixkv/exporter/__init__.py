"""Exporter: a model + retention profile -> an engine folder (two ONNX graphs, manifest).

    onnx.py           the prefill/decode graph wrappers and torch.onnx.export (dynamo)
    engine_folder.py  the folder layout, atomic writing, manifest and its verification
    build.py          the pipeline behind `prefixkv build` / scripts/build_engine.py
    commands.py       the `build`, `generate` and `validate` subcommands

Nothing is imported here: the engine-folder check also runs where torch is missing.
"""
