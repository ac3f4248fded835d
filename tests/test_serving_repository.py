"""Writing Triton model repositories: config.pbtxt through Triton's ModelConfig protobuf,
layout, vendored runtime, manifest checks, the TensorRT-LLM llmapi variant and the CLI.

No server here (tests/test_serving_server.py starts one).  The engine folders are real
engine folders as far as the manifest goes (every file hashed, profile checked) but hold
placeholder graphs: nothing here runs them.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prefixkv.serving.pbtxt import (
    ModelConfigError,
    check_model_config,
    parse_model_config,
)
from prefixkv.serving.repository import (
    MODEL_NAME,
    TEMPLATE,
    ModelSettings,
    RepositoryExistsError,
    model_config_text,
    write_repository,
)
from prefixkv.serving.trtllm_repository import (
    attention_windows,
    write_trtllm_repository,
)

LAYER_FRACTIONS = [0.1, 0.15, 0.2, 0.25, 0.3]


@pytest.fixture
def engine(tmp_path) -> Path:
    """A manifest-complete engine folder (placeholder graphs) with 5 layers at keep fraction 0.2."""
    from placeholders import engine_fields

    from prefixkv.engine_folder import write_manifest
    from prefixkv.models import resolve
    from prefixkv.profile import Fingerprint, LayerKeep, RetentionProfile

    folder = tmp_path / "engine"
    folder.mkdir()
    for name in ("decoder.onnx", "compact.onnx"):
        (folder / name).write_bytes(b"placeholder graph")
    (folder / "tokenizer.json").write_bytes((resolve("smollm2-135m") / "tokenizer.json").read_bytes())
    fingerprint = Fingerprint("LlamaForCausalLM", 5, 4, 2, 16, "0123456789abcdef")
    RetentionProfile(fingerprint, sink=4, calibrated={0.2: LayerKeep(LAYER_FRACTIONS, [0.0] * 5)}).save(folder / "profile.json")
    write_manifest(folder, engine_fields(fingerprint, LAYER_FRACTIONS))
    return folder


# -- config.pbtxt -----------------------------------------------------------------------
def test_config_parses_with_tritons_model_config():
    from tritonclient.grpc import model_config_pb2

    settings = ModelSettings(instances=3, threads=2, default_max_tokens=16, chat=True, max_batch_size=4, kv_cache_memory_mib=96)
    config = parse_model_config(model_config_text(settings))
    assert isinstance(config, model_config_pb2.ModelConfig)
    assert config.name == MODEL_NAME and config.backend == "python"
    assert config.model_transaction_policy.decoupled
    assert config.max_batch_size == 0
    inputs = {i.name: i for i in config.input}
    assert set(inputs) == {"text_input", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "chat"}
    assert not inputs["text_input"].optional and all(i.optional for n, i in inputs.items() if n != "text_input")
    types = model_config_pb2.DataType
    assert inputs["text_input"].data_type == types.TYPE_STRING
    assert inputs["max_tokens"].data_type == types.TYPE_INT64
    assert inputs["stream"].data_type == types.TYPE_BOOL
    assert list(inputs["stop"].dims) == [-1]
    assert {o.name for o in config.output} == {"text_output", "output_ids", "finish_reason"}
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 3)]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params == {"engine_dir": "engine", "backend": "auto", "threads": "2", "default_max_tokens": "16", "chat": "true",
                      "max_batch_size": "4", "kv_cache_memory_mib": "96", "max_queue": "256"}
    with_image = parse_model_config(model_config_text(image=True))  # vision engines: the optional image bytes
    image = {i.name: i for i in with_image.input}["image"]
    assert image.optional and image.data_type == types.TYPE_STRING and list(image.dims) == [-1]


def test_config_errors_are_reported_with_the_place():
    with pytest.raises(ModelConfigError, match=r"config.pbtxt.*1:\d+"):
        parse_model_config('name: "x" bakend: "python"')
    config = parse_model_config(model_config_text(name="other"))
    with pytest.raises(ModelConfigError, match="model folder is 'prefixkv_llm'"):
        check_model_config(config, "config.pbtxt", name=MODEL_NAME)
    with pytest.raises(ModelConfigError, match="'prompt' is missing"):
        check_model_config(config, "config.pbtxt", required_inputs=("prompt",))


# -- the repository -------------------------------------------------------------------------
def test_repository_layout(engine, tmp_path):
    model_dir = write_repository(engine, tmp_path / "repo", ModelSettings(instances=2, threads=1))
    assert model_dir == tmp_path / "repo" / MODEL_NAME
    config = parse_model_config((model_dir / "config.pbtxt").read_text())
    check_model_config(config, "config.pbtxt", name=MODEL_NAME, backend="python", decoupled=True)
    assert config.instance_group[0].count == 2
    # the engine's numbers, for reading: keep fraction, context, per-layer capacities at the whole context
    manifest = json.loads((engine / "manifest.json").read_text())
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["keep_fraction"] == f"{manifest['keep_fraction']:g}"
    assert params["max_context"] == str(manifest["max_context"])
    context, sink = manifest["max_context"], manifest["sink"]
    want = [max(min(int(f * context + 0.5), context), sink + 1) for f in manifest["layer_keep_fractions"]]
    assert [int(c) for c in params["layer_capacities"].split(",")] == want
    version = model_dir / "1"
    assert (version / "model.py").read_text() == TEMPLATE.read_text()
    copied = version / "engine"
    assert not copied.is_symlink()
    assert json.loads((copied / "manifest.json").read_text()) == json.loads((engine / "manifest.json").read_text())
    for module in ("engines/base.py", "engines/onnxruntime.py", "engines/__init__.py", "tokenizer.py", "engine_folder.py"):
        assert (version / "prefixkv" / module).is_file(), module
    assert not list((version / "prefixkv").rglob("__pycache__"))


def test_repository_link_existing_and_force(engine, tmp_path):
    repo = tmp_path / "repo"
    model_dir = write_repository(engine, repo, link=True)
    assert (model_dir / "1" / "engine").is_symlink()
    assert (model_dir / "1" / "engine").resolve() == engine.resolve()
    with pytest.raises(RepositoryExistsError, match="--force"):
        write_repository(engine, repo)
    write_repository(engine, repo, force=True)
    assert not (model_dir / "1" / "engine").is_symlink()


def test_repository_refuses_a_tampered_or_missing_engine(engine, tmp_path):
    from prefixkv.engine_folder import EngineError

    with pytest.raises(FileNotFoundError, match="prefixkv build"):
        write_repository(tmp_path / "nowhere", tmp_path / "repo")
    (engine / "decoder.onnx").write_bytes(b"placeholder graph!")
    with pytest.raises(EngineError, match="modified after the build"):
        write_repository(engine, tmp_path / "repo")
    assert not (tmp_path / "repo" / MODEL_NAME).exists()


def test_repository_rejects_bad_settings(engine, tmp_path):
    for flag, bad in (("--instances", {"instances": 0}), ("--threads", {"threads": 0}),
                      ("--max-batch-size", {"max_batch_size": 0}), ("--kv-cache-memory-mib", {"kv_cache_memory_mib": 0})):
        with pytest.raises(ValueError, match=flag):
            write_repository(engine, tmp_path / "repo", ModelSettings(**bad))


def test_vendored_runtime_imports_without_torch_or_transformers(engine, tmp_path):
    """What model.py imports inside the Python backend stub: numpy/onnxruntime/tokenizers/jinja2 only."""
    version = write_repository(engine, tmp_path / "repo") / "1"
    code = f"""
import sys, types
from pathlib import Path
sys.modules["triton_python_backend_utils"] = types.ModuleType("triton_python_backend_utils")  # the stub's module
sys.path.insert(0, {str(version)!r})
import model
load_runner = model._import_runtime(Path({str(version)!r}))
import prefixkv.engines.onnxruntime, prefixkv.engines.base, prefixkv.tokenizer, prefixkv.engine_folder
assert prefixkv.engines.base.__file__.startswith({str(version)!r}), prefixkv.engines.base.__file__
import onnxruntime, prefixkv.engines.compaction_graph as compaction_graph  # the runner's compaction graph, without onnx
onnxruntime.InferenceSession(compaction_graph.serialized("float32"), providers=["CPUExecutionProvider"])
heavy = sorted(m for m in ("torch", "transformers", "ssl", "onnx") if m in sys.modules)
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


# -- TensorRT-LLM llmapi variant --------------------------------------------------------------
def test_attention_windows():
    assert attention_windows([0.1, 0.25, 1.0], 1000) == [100, 250, 1000]
    assert attention_windows([0.001], 1000, sink=4) == [5]  # the sinks and the last token
    with pytest.raises(ValueError):
        attention_windows([0.5], 0)


def test_trtllm_repository(engine, tmp_path):
    yaml = pytest.importorskip("yaml")
    model_dir = write_trtllm_repository(engine, tmp_path / "trt", reference_tokens=800)
    config = parse_model_config((model_dir / "config.pbtxt").read_text())
    check_model_config(config, "config.pbtxt", name="tensorrt_llm", backend="python",
                       required_inputs=("text_input",), outputs=("text_output",))
    names = {i.name for i in config.input}
    assert {"streaming", "sampling_param_max_tokens", "sampling_param_temperature", "sampling_param_stop"} <= names
    data = yaml.safe_load((model_dir / "1" / "model.yaml").read_text())
    assert data["model"] == "/models/tiny" and data["backend"] == "pytorch"
    assert data["max_seq_len"] == 1000
    assert data["kv_cache_config"]["max_attention_window"] == [80, 120, 160, 200, 240]
    assert data["triton_config"] == {"max_batch_size": 0, "decoupled": True}
    notes = (model_dir / "1" / "PREFIXKV.md").read_text()
    assert "model.py" in notes and "not its choice of which entries to keep" in notes
    with pytest.raises(ValueError, match="longer than the engine's context"):
        write_trtllm_repository(engine, tmp_path / "trt2", reference_tokens=5000)


# -- CLI ------------------------------------------------------------------------------------
def test_deploy_command(engine, tmp_path, capsys):
    from prefixkv.cli import main

    repo, trt = tmp_path / "repo", tmp_path / "trt"
    assert main(["deploy", str(engine), "--repository", str(repo), "--instances", "2", "--threads", "1",
                 "--trtllm", str(trt), "--trtllm-model", "HuggingFaceTB/SmolLM2-135M-Instruct"]) == 0
    assert parse_model_config((repo / MODEL_NAME / "config.pbtxt").read_text()).instance_group[0].count == 2
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in (trt / "tensorrt_llm" / "1" / "model.yaml").read_text()
    capsys.readouterr()
    assert main(["deploy", str(engine), "--repository", str(repo)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["deploy", str(tmp_path / "missing"), "--repository", str(repo)]) == 2
    assert "prefixkv build" in capsys.readouterr().err


def test_server_finds_tritonserver_and_refuses_a_missing_repository(tmp_path):
    from prefixkv.serving.server import TritonServer, find_tritonserver

    dist = find_tritonserver()
    assert dist.binary.is_file()
    if dist.stub is not None:  # the nvidia-pytriton wheel: the stub for this Python version
        assert f"{sys.version_info.major}.{sys.version_info.minor}" in str(dist.stub)
        assert (dist.backend_dir / "python" / "libtriton_python.so").is_file()
    with pytest.raises(FileNotFoundError, match="prefixkv deploy"):
        TritonServer(tmp_path / "nothing")
