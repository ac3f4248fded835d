"""Checking ``config.pbtxt`` files with Triton's own ``ModelConfig`` protobuf.

Every configuration ``prefixkv deploy`` writes goes through :func:`parse_model_config`
before it is written, so a malformed or misspelled field fails at deploy time with the
line and column, not when the server loads the repository.
"""
from __future__ import annotations

from pathlib import Path


class ModelConfigError(ValueError):
    """A config.pbtxt that Triton would refuse, with where and why."""


def parse_model_config(text: str, source: str = "config.pbtxt"):
    """Parse ``text`` into ``tritonclient.grpc.model_config_pb2.ModelConfig`` (raises ModelConfigError)."""
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError as err:
        raise ImportError(
            f"checking {source} needs Triton's client protobufs ({err}); pip install 'tritonclient[grpc]'"
        ) from err
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as err:
        raise ModelConfigError(f"{source} is not a valid Triton model configuration: {err}") from err
    return config


def check_model_config(config, source: str, name: str | None = None, backend: str | None = None,
                       decoupled: bool | None = None, required_inputs=(), outputs=()) -> None:
    """Semantic checks on a parsed ModelConfig that the protobuf parser cannot do."""
    problems = []
    if name is not None and config.name != name:
        problems.append(f"name is {config.name!r} but the model folder is {name!r}")
    if backend is not None and config.backend != backend:
        problems.append(f"backend is {config.backend!r}, expected {backend!r}")
    if decoupled is not None and config.model_transaction_policy.decoupled != decoupled:
        problems.append(f"model_transaction_policy.decoupled must be {str(decoupled).lower()}")
    inputs = [i.name for i in config.input]
    duplicated = sorted({n for n in inputs if inputs.count(n) > 1})
    if duplicated:
        problems.append(f"inputs listed twice: {', '.join(duplicated)}")
    by_name = {i.name: i for i in config.input}
    for required in required_inputs:
        if required not in by_name:
            problems.append(f"input {required!r} is missing")
        elif by_name[required].optional:
            problems.append(f"input {required!r} must not be optional")
    names = {o.name for o in config.output}
    for out in outputs:
        if out not in names:
            problems.append(f"output {out!r} is missing")
    for tensor in list(config.input) + list(config.output):
        if not tensor.dims:
            problems.append(f"{tensor.name!r} has no dims")
    for group in config.instance_group:
        if group.count < 1:
            problems.append("instance_group count must be at least 1")
    if problems:
        raise ModelConfigError(f"{source}: " + "; ".join(problems))


def write_model_config(path: str | Path, text: str, **checks):
    """Parse and check ``text``, then write it to ``path``; returns the parsed ModelConfig."""
    path = Path(path)
    config = parse_model_config(text, str(path))
    check_model_config(config, str(path), **checks)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return config
