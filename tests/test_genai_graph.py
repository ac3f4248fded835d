"""onnxruntime-genai's graph run from Python (``bench.genai_graph``): a hand-built model in
onnxruntime-genai's layout (its input and output names, past and present sharing buffers,
the fused attention rotating from its cos/sin caches by each row's length).  The loop's
logits must be the graph's own over the whole sequence, run afresh with an empty cache."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper, save

from prefixkv.engine_folder import EngineError
from test_export import one_torch_thread, tiny  # noqa: F401  (fixtures)

VOCAB, HEADS, KV_HEADS, HEAD, LAYERS, ROWS = 256, 2, 1, 16, 2, 64


def genai_model(folder, share_buffer: bool = True):
    """A 2-layer attention-only decoder in onnxruntime-genai's layout, seeded random weights."""
    rng = np.random.default_rng(0)
    hidden = HEADS * HEAD
    weights = {"embed": rng.normal(size=(VOCAB, hidden)), "head": rng.normal(size=(hidden, VOCAB)) * 0.3}
    inv = 1.0 / 10000 ** (np.arange(0, HEAD, 2) / HEAD)
    angles = np.arange(ROWS)[:, None] * inv[None, :]
    weights["cos_cache"], weights["sin_cache"] = np.cos(angles), np.sin(angles)
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["x0"]),
        helper.make_node("ReduceSum", ["attention_mask", "axis1"], ["held"], keepdims=0),
        helper.make_node("Sub", ["held", "one"], ["held1"]),
        helper.make_node("Cast", ["held1"], ["seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["width"], start=1),
        helper.make_node("Cast", ["width"], ["total"], to=TensorProto.INT32),
    ]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    for l in range(LAYERS):
        weights[f"qkv{l}"] = rng.normal(size=(hidden, (HEADS + 2 * KV_HEADS) * HEAD)) * 0.3
        weights[f"o{l}"] = rng.normal(size=(hidden, hidden)) * 0.3
        past = [f"past_key_values.{l}.{p}" for p in ("key", "value")]
        present = [f"present.{l}.{p}" for p in ("key", "value")]
        nodes += [helper.make_node("MatMul", [f"x{l}", f"qkv{l}"], [f"qkv_out{l}"]),
                  helper.make_node("GroupQueryAttention", [f"qkv_out{l}", "", "", *past, "seqlens_k", "total",
                                                           "cos_cache", "sin_cache"],
                                   [f"attn{l}", *present], domain="com.microsoft", num_heads=HEADS,
                                   kv_num_heads=KV_HEADS, do_rotary=1),
                  helper.make_node("MatMul", [f"attn{l}", f"o{l}"], [f"o_out{l}"]),
                  helper.make_node("Add", [f"x{l}", f"o_out{l}"], [f"x{l + 1}"])]
        inputs += [helper.make_tensor_value_info(p, TensorProto.FLOAT, ["batch", KV_HEADS, "past", HEAD]) for p in past]
        outputs += [helper.make_tensor_value_info(p, TensorProto.FLOAT, ["batch", KV_HEADS, "present", HEAD])
                    for p in present]
    nodes.append(helper.make_node("MatMul", [f"x{LAYERS}", "head"], ["logits"]))
    initializers = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    initializers += [numpy_helper.from_array(np.array([1], np.int64), "axis1"), numpy_helper.from_array(np.array(1, np.int64), "one")]
    graph = helper.make_graph(nodes, "genai-like", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    save(model, str(folder / "model.onnx"))
    decoder = {"filename": "model.onnx", "head_size": HEAD, "hidden_size": hidden, "num_attention_heads": HEADS,
               "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
               "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                          "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
               "outputs": {"logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}}
    config = {"model": {"decoder": decoder, "context_length": ROWS, "type": "llama"},
              "search": {"past_present_share_buffer": share_buffer, "max_length": ROWS}}
    (folder / "genai_config.json").write_text(json.dumps(config))
    return folder


def fresh_logits(session, ids: list[int]) -> np.ndarray:
    """The graph over the whole sequence from an empty cache (no shared buffers): its last logits."""
    empty = np.zeros((1, KV_HEADS, 0, HEAD), np.float32)
    feeds = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    feeds.update({f"past_key_values.{l}.{p}": empty for l in range(LAYERS) for p in ("key", "value")})
    return session.run(["logits"], feeds)[0][:, -1]


def test_the_loop_decodes_as_the_graph_does_over_the_whole_sequence(tmp_path):
    import onnxruntime as ort

    from prefixkv.bench.genai_graph import GenaiGraphLoop

    folder = genai_model(tmp_path / "genai")
    loop = GenaiGraphLoop(folder, threads=1)
    reference = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = [5, 17, 200, 3, 99, 42, 7]
    logits = loop.prefill(ids, steps=6)
    for step in range(6):
        np.testing.assert_allclose(logits, fresh_logits(reference, ids), rtol=1e-4, atol=1e-4)
        ids.append(int(logits.argmax(-1)[0]))
        logits = loop.decode(ids[-1])
        assert loop.run_seconds > 0 and loop.length == len(ids)
    np.testing.assert_allclose(logits, fresh_logits(reference, ids), rtol=1e-4, atol=1e-4)
    # the rotation reads each token's position from the row's length: a token decoded at another
    # place in the sequence gives other logits (so a misplaced slot would not pass the check above)
    assert not np.allclose(fresh_logits(reference, ids[:-2] + ids[-1:]), fresh_logits(reference, ids), atol=1e-3)
    with pytest.raises(ValueError, match="holds its 13 tokens"):
        loop.decode(1)


def test_a_folder_the_loop_cannot_run_is_refused_in_one_line(tmp_path):
    from prefixkv.bench.genai_graph import GenaiGraphLoop, GenaiLayout

    with pytest.raises(EngineError, match="no genai_config.json"):
        GenaiLayout.read(tmp_path)
    with pytest.raises(EngineError, match="share their buffers"):
        GenaiLayout.read(genai_model(tmp_path / "copying", share_buffer=False))
    folder = genai_model(tmp_path / "broken")
    config = json.loads((folder / "genai_config.json").read_text())
    del config["model"]["decoder"]["inputs"]["attention_mask"]
    (folder / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError, match="lacks the decoder's 'attention_mask'"):
        GenaiLayout.read(folder)
    (folder / "model.onnx").unlink()
    config["model"]["decoder"]["inputs"]["attention_mask"] = "attention_mask"
    (folder / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(EngineError, match="names the graph model.onnx, which is not in"):
        GenaiLayout.read(folder)
    with pytest.raises(ValueError, match="decode before prefill"):
        GenaiGraphLoop(genai_model(tmp_path / "fine"), threads=1).decode(3)
    # past the model's context (its rotary caches' rows): refused before any run, not by ONNX Runtime mid-way
    with pytest.raises(ValueError, match="60 prompt tokens and 10 steps exceed the model's context of 64"):
        GenaiGraphLoop(tmp_path / "fine", threads=1).prefill(list(range(60)), steps=10)

    def edited(name, edit):
        folder = genai_model(tmp_path / name)
        config = json.loads((folder / "genai_config.json").read_text())
        edit(config["model"]["decoder"])
        (folder / "genai_config.json").write_text(json.dumps(config))
        return folder

    with pytest.raises(EngineError, match="has a bad value"):
        GenaiLayout.read(edited("bad-value", lambda d: d.update(num_hidden_layers="two")))
    with pytest.raises(EngineError, match="needs one %d for the layer"):
        GenaiLayout.read(edited("no-layer", lambda d: d["inputs"].update(past_key_names="past.key")))
    # a name the graph does not have: one line naming it, not ONNX Runtime's error at the first run
    renamed = edited("renamed", lambda d: d["inputs"].update(past_key_names="cache.%d.key"))
    with pytest.raises(EngineError, match=r"names inputs the graph lacks \(cache.0.key, cache.1.key\) or the graph takes "
                                          r"inputs the loop does not bind \(past_key_values.0.key, past_key_values.1.key\)"):
        GenaiGraphLoop(renamed, threads=1)


def test_a_paired_point_runs_the_genai_graph_as_a_target(tmp_path, tiny):  # noqa: F811 (the fixture)
    """``bench.paired`` takes ``genai-graph:FOLDER`` beside an engine: both decode the prompt,
    the graph's run within its step reported as an engine's is."""
    engine_dir = str(tiny[0])
    folder = genai_model(tmp_path / "genai")
    shutil.copy(tiny[0] / "tokenizer.json", folder / "tokenizer.json")
    proc = subprocess.run([sys.executable, "-m", "prefixkv.bench.paired", f"genai-graph:{folder}", engine_dir, "40",
                           "--blocks", "2", "--block-steps", "3", "--threads", "1"], capture_output=True, text=True,
                          check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got["ratios"]) == 2 and 0 < got["a_run_ms_per_token"] < got["a_ms_per_token"]
    refused = subprocess.run([sys.executable, "-m", "prefixkv.bench.paired", f"genai-graph:{folder}", engine_dir, "40,30"],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "takes one row here, not 2" in refused.stderr.strip().splitlines()[-1]
    # 40 tokens and 12 blocks of 8 steps: past the model's 64 rows, refused as a plan
    refused = subprocess.run([sys.executable, "-m", "prefixkv.bench.paired", f"genai-graph:{folder}", engine_dir, "40",
                              "--threads", "1"], capture_output=True, text=True)
    assert refused.returncode == 2 and "40 prompt tokens and 97 steps exceed" in refused.stderr.strip().splitlines()[-1]
