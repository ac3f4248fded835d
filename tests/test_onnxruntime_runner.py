"""OnnxRuntimeRunner: generation equals the PyTorch reference, providers, IOBinding, errors, CLI."""
from __future__ import annotations

import numpy as np
import pytest
from test_export import KEEP, one_torch_thread, tiny_engine  # noqa: F401  (autouse)

from prefixkv.engines import load_runner
from prefixkv.engines.base import GenerationConfig, PromptError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_engine(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def engine(tiny):
    return load_runner(tiny[0], threads=1)


def test_generation_equals_reference(tiny, engine):
    from prefixkv.engines.torch import TorchRunner

    engine_dir, model, profile = tiny
    reference = TorchRunner(model, engine_dir, profile=profile, keep_fraction=KEEP, method="prefixkv")
    prompts = ["The quick brown fox jumps over the lazy dog. " * 3, "def main():\n    return 0\n"]
    config = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    got = engine.generate(prompts, config)
    want = reference.generate(prompts, config)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert [g.text for g in got] == [w.text for w in want]
    assert engine.name == "onnxruntime" and engine.providers == ["CPUExecutionProvider"]


def test_caches_stay_ortvalues_between_steps(engine):
    import onnxruntime as ort

    ids, mask = engine.pad([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    logits, state = engine.prefill(ids, mask)
    assert logits.dtype == np.float32 and logits.shape == (1, 256)
    logits, state = engine.decode(state, logits.argmax(-1))
    assert all(isinstance(v, ort.OrtValue) for v in state.kv + state.slots)
    assert state.positions.tolist() == [11]
    assert engine.kv_bytes(state) > 0


def test_load_runner_backends(tiny):
    engine_dir, model, _ = tiny
    torch_runner = load_runner(engine_dir, backend="torch", model=model)
    ort_runner = load_runner(engine_dir, backend="ort")
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    prompt = "Hello world, hello engine."
    assert torch_runner.generate(prompt, config)[0].token_ids == ort_runner.generate(prompt, config)[0].token_ids
    with pytest.raises(ValueError, match="unknown backend 'tensorflow'"):
        load_runner(engine_dir, backend="tensorflow")


def test_missing_provider_names_the_fix(tiny):
    from prefixkv.engines.onnxruntime import ProviderError, resolve_providers

    with pytest.raises(ProviderError, match="onnxruntime-gpu"):
        load_runner(tiny[0], providers=["tensorrt"])
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers(None)[-1] == "CPUExecutionProvider"


def test_bad_prompts(engine):
    with pytest.raises(PromptError, match="empty"):
        engine.generate("   ")
    with pytest.raises(PromptError, match="context of 512"):
        engine.generate("x" * 600, GenerationConfig(max_new_tokens=4))


def test_cli_generate_prints_only_the_text(tiny, capsys):
    from prefixkv.cli import main

    engine_dir = str(tiny[0])
    assert main(["generate", engine_dir, "--prompt", "Hello there", "--max-new-tokens", "6", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    (result,) = load_runner(engine_dir).generate("Hello there", GenerationConfig(max_new_tokens=6))
    assert out == result.text + "\n"
    assert "[onnxruntime]" in err
    assert main(["generate", engine_dir, "--prompt", "Hi", "--chat", "--stream", "--max-new-tokens", "4",
                 "--temperature", "0.8", "--seed", "1"]) == 0
    capsys.readouterr()
    code = main(["generate", engine_dir, "--prompt", ""])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["error: the prompt is empty; give some text"]
    code = main(["generate", engine_dir, "--prompt", "Hi", "--providers", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "onnxruntime-gpu" in err[0]


def test_cli_generate_reads_the_prompt_from_a_file(tiny, capsys, tmp_path):
    from prefixkv.cli import main

    engine_dir = str(tiny[0])
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello there", encoding="utf-8")
    assert main(["generate", engine_dir, "--prompt-file", str(prompt), "--max-new-tokens", "6"]) == 0
    from_file = capsys.readouterr().out
    assert main(["generate", engine_dir, "--prompt", "Hello there", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == from_file
    assert main(["generate", engine_dir, "--prompt-file", str(tmp_path / "missing.txt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no prompt file at {tmp_path / 'missing.txt'}"
    prompt.write_bytes(b"\xff\xfe bad")
    assert main(["generate", engine_dir, "--prompt-file", str(prompt)]) == 2
    assert "is not UTF-8 text" in capsys.readouterr().err


def test_cli_generate_takes_standard_input_and_refuses_bytes_that_are_not_utf8(tiny, capsys, monkeypatch):
    """'-' reads the prompt from standard input as UTF-8 bytes; bytes that are not UTF-8, on
    standard input or in --prompt (where they arrive as surrogate escapes), get one line."""
    import io

    from prefixkv.cli import main

    engine_dir = str(tiny[0])
    assert main(["generate", engine_dir, "--prompt", "Hello there", "--max-new-tokens", "4"]) == 0
    direct = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"Hello there")))
    assert main(["generate", engine_dir, "--prompt-file", "-", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == direct
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait")))
    assert main(["generate", engine_dir, "--prompt-file", "-"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: standard input is not UTF-8 text (invalid continuation byte: byte 0xe9 at offset 3); "
                   "convert it to UTF-8 (e.g. iconv -t UTF-8)"]
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what argv holds for those bytes
    assert main(["generate", engine_dir, "--prompt", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --prompt is not UTF-8 text (byte 0xe9 at character 3)")
    for value in ("inf", "nan", "-1"):
        with pytest.raises(SystemExit):
            main(["generate", engine_dir, "--prompt", "Hi", "--temperature", value])
        assert "--temperature: expected a finite number >= 0" in capsys.readouterr().err


def test_validation_prompts_longer_than_the_context_name_the_flags(tiny, capsys):
    """The tiny engine's context is 512: built-in validation prompts that cannot fit are refused
    before any work, naming the flags that set them (not a prompt the user never gave)."""
    from prefixkv.cli import main

    code = main(["validate", str(tiny[0]), "--validate-tokens", "500", "--validate-new-tokens", "32"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and err == ["error: validation prompts of 500 tokens + 32 new tokens do not fit the engine's context "
                                 "of 512: pass --validate-tokens and --validate-new-tokens that sum to at most 512"]


def test_compact_slots_right_aligns_each_rows_entries():
    from prefixkv.engines.onnxruntime import compact_slots

    positions = np.array([[-1, 0, -1, 4, 7], [1, 2, 3, -1, 9]])
    index, pos, valid = compact_slots(positions, positions >= 0)
    assert pos.tolist() == [[-1, 0, 4, 7], [1, 2, 3, 9]]
    assert valid.tolist() == [[False, True, True, True], [True] * 4]
    assert index.tolist() == [[0, 1, 3, 4], [0, 1, 2, 4]]
    # shared slots: each row's entries first, the empty slots after them
    index, pos, valid = compact_slots(positions, positions >= 0, left=True)
    assert pos.tolist() == [[0, 4, 7, -1], [1, 2, 3, 9]]
    assert valid.tolist() == [[True, True, True, False], [True] * 4]
    assert index.tolist() == [[1, 3, 4, 0], [0, 1, 2, 4]]


def test_the_fused_attention_stops_at_each_rows_own_length():
    """What a full-cache engine's decoder relies on (``row_lengths`` in the exporter): with
    rows of 5 and 3 entries at the front of their buffers and no bias, ONNX Runtime's
    GroupQueryAttention given seqlens_k = each row's length writes the row's new key and value
    right after its entries, leaves the slots past them as they were, and attends to that
    row's entries and its new token only (a NumPy attention of the same rotated q/k)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    heads, kv_heads, dim, capacity, rows = 4, 2, 16, 10, 32
    f, i32, i64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("qkv", f, [2, 1, (heads + 2 * kv_heads) * dim]),
              *(helper.make_tensor_value_info(n, f, [2, kv_heads, capacity, dim]) for n in ("past_key", "past_value")),
              helper.make_tensor_value_info("seqlens_k", i32, [2]), helper.make_tensor_value_info("total", i32, [1]),
              *(helper.make_tensor_value_info(n, f, [rows, dim // 2]) for n in ("cos", "sin")),
              helper.make_tensor_value_info("position_ids", i64, [2, 1])]
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("out", "present_key", "present_value")]
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total", "cos",
                                                    "sin", "position_ids"], [o.name for o in outputs],
                            domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, scale=dim ** -0.5)
    model = helper.make_model(helper.make_graph([node], "attention", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    angles = np.arange(rows)[:, None] * 10000.0 ** (-np.arange(dim // 2) * 2 / dim)
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)

    def rotate(x, position):  # the half-split rotation
        first, second = x[..., : dim // 2], x[..., dim // 2 :]
        return np.concatenate([first * cos[position] - second * sin[position], second * cos[position] + first * sin[position]], -1)

    lengths = [5, 3]
    keys, values = (rng.standard_normal((2, kv_heads, capacity, dim), dtype=np.float32) for _ in range(2))
    qkv = rng.standard_normal((2, 1, (heads + 2 * kv_heads) * dim), dtype=np.float32)
    positions = np.array([[5], [3]], np.int64)
    buffers = [ort.OrtValue.ortvalue_from_numpy(array.copy()) for array in (keys, values)]
    binding = session.io_binding()
    binding.bind_output("out")  # first: the binding's outputs come back in the order bound
    for name, buffer in zip(("key", "value"), buffers):  # in place, as the engine binds them
        binding.bind_ortvalue_input(f"past_{name}", buffer)
        binding.bind_ortvalue_output(f"present_{name}", buffer)
    for name, array in (("qkv", qkv), ("seqlens_k", np.array(lengths, np.int32)), ("total", np.array([6], np.int32)),
                        ("cos", cos), ("sin", sin), ("position_ids", positions)):
        binding.bind_cpu_input(name, array)
    session.run_with_iobinding(binding)
    out = binding.get_outputs()[0].numpy()
    written = [buffer.numpy() for buffer in buffers]
    for row, n in enumerate(lengths):
        flat = qkv[row, 0]
        query = rotate(flat[: heads * dim].reshape(heads, dim), n)
        key = rotate(flat[heads * dim : (heads + kv_heads) * dim].reshape(kv_heads, dim), n)
        value = flat[(heads + kv_heads) * dim :].reshape(kv_heads, dim)
        np.testing.assert_allclose(written[0][row, :, n], key, atol=1e-5)
        np.testing.assert_array_equal(written[1][row, :, n], value)
        for before, after in zip((keys, values), written):  # the slots past the new token: untouched
            np.testing.assert_array_equal(after[row, :, n + 1 :], before[row, :, n + 1 :])
        for head in range(heads):
            group = head // (heads // kv_heads)
            k = np.concatenate([keys[row, group, :n], key[group][None]])
            v = np.concatenate([values[row, group, :n], value[group][None]])
            scores = k @ query[head] * dim ** -0.5
            weights = np.exp(scores - scores.max())
            np.testing.assert_allclose(out[row, 0, head * dim : (head + 1) * dim], weights / weights.sum() @ v, atol=1e-5)


def test_stored_compaction_graph_is_the_built_one():
    """The runner ships its compaction graph serialized (no onnx at run time): it must be
    the model ``build`` makes."""
    import onnx

    from prefixkv.engines.compaction_graph import DTYPES, build, serialized

    for dtype in DTYPES:
        assert onnx.load_from_string(serialized(dtype)) == onnx.load_from_string(build(dtype)), dtype


def test_a_consumed_state_is_refused(engine):
    """A decode step writes into its state's buffers: decoding the same state twice would
    corrupt the newer one, so it is refused, and reading its cache is refused in one line."""
    logits, state = engine.prefill(*engine.pad([[5, 6, 7, 8, 9, 10, 11]]))
    token = logits.argmax(-1)
    logits, newer = engine.decode(state, token)
    with pytest.raises(ValueError, match="consumed"):
        engine.decode(state, token)
    for read in (engine.kept_positions, engine.layer_lengths, lambda s: engine.cache(s, 0)):  # one line, not a TypeError
        with pytest.raises(ValueError, match="this state was consumed by a later step or merge"):
            read(state)
    engine.decode(newer, logits.argmax(-1))


def _tied_graph(folder, tied: bool = True):
    """logits = table[ids] @ table.T, the table in external data (one initializer for both
    nodes when ``tied``, two copies otherwise)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    inits = [numpy_helper.from_array(table, "table")]
    if not tied:
        inits.append(numpy_helper.from_array(table.copy(), "head"))
    nodes = [helper.make_node("Gather", ["table", "ids"], ["hidden"]),
             helper.make_node("Gemm", ["hidden", "table" if tied else "head"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    path = folder / "decoder.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="decoder.onnx.data", size_threshold=0)
    return path, table


def test_a_tied_table_reaches_the_gemm_through_a_second_initializer_over_the_same_bytes(tmp_path):
    import onnx
    import onnxruntime as ort

    from prefixkv.engines.onnxruntime import session_options, untie_packed_tables

    path, table = _tied_graph(tmp_path)
    data = (tmp_path / "decoder.onnx.data").read_bytes()
    serialized = untie_packed_tables(path)
    model = onnx.ModelProto.FromString(serialized)
    gather, gemm = model.graph.node
    assert gather.input[0] == "table" and gemm.input[1] == "table.packed"
    inits = {i.name: i for i in model.graph.initializer}
    assert {e.key: e.value for e in inits["table.packed"].external_data} == {e.key: e.value for e in inits["table"].external_data}
    assert list(inits["table.packed"].dims) == [32, 8]
    assert (tmp_path / "decoder.onnx.data").read_bytes() == data  # the file is untouched
    options = session_options(ort, 1)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(tmp_path))
    ids = np.array([3, 0, 31, 3])
    got = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    np.testing.assert_allclose(got, table[ids] @ table.T, rtol=1e-5, atol=1e-5)


def test_a_graph_without_a_tied_table_loads_from_its_path(tmp_path):
    from prefixkv.engines.onnxruntime import untie_packed_tables

    path, _ = _tied_graph(tmp_path, tied=False)
    assert untie_packed_tables(path) is None


def test_a_tied_table_read_in_both_phases_is_untied_in_both(tmp_path):
    """The decoder's phases are an If's branches: the lookup and the head of each read the
    main graph's table, and each head reads it through the one second initializer."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from prefixkv.engines.onnxruntime import session_options, untie_packed_tables

    table = np.random.default_rng(1).normal(size=(32, 8)).astype(np.float32)

    def branch(name):
        return helper.make_graph([helper.make_node("Gather", ["table", "ids"], [f"{name}/hidden"]),
                                  helper.make_node("Gemm", [f"{name}/hidden", "table"], [f"{name}/logits"], transB=1)],
                                 name, [], [helper.make_tensor_value_info(f"{name}/logits", TensorProto.FLOAT, None)])

    graph = helper.make_graph([helper.make_node("If", ["first"], ["logits"], then_branch=branch("prefill"),
                                                else_branch=branch("decode"))], "phases",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]),
                               helper.make_tensor_value_info("first", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 32])],
                              [numpy_helper.from_array(table, "table")])
    path = tmp_path / "decoder.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path),
                    save_as_external_data=True, all_tensors_to_one_file=True, location="decoder.onnx.data", size_threshold=0)
    serialized = untie_packed_tables(path)
    model = onnx.ModelProto.FromString(serialized)
    heads = [n for a in model.graph.node[0].attribute for n in a.g.node if n.op_type == "Gemm"]
    assert [n.input[1] for n in heads] == ["table.packed", "table.packed"]
    assert [i.name for i in model.graph.initializer] == ["table", "table.packed"]
    options = session_options(ort, 1)
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(tmp_path))
    session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    ids = np.array([3, 0, 31])
    for first in (True, False):
        got = session.run(None, {"ids": ids, "first": np.array(first)})[0]
        np.testing.assert_allclose(got, table[ids] @ table.T, rtol=1e-5, atol=1e-5)
