"""ONNX export of a tiny random Llama: the decoder and compact graphs against the PyTorch reference.

The tiny engine is built once per session (``tiny_engine``, shared with the other engine
test files) and compared with ``TorchRunner`` (the HF model + ``PrefixKVCache``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama

LAYERS = 3
KEEP = 0.4
FRACTIONS = [0.3, 1.0, 0.25]  # distinct per layer; 1.0 exercises the no-scoring path
# the tiny random models' quality numbers mean nothing: reported, not checked (the default tolerances are for real models)
SMALL_VALIDATION = dict(n_prompts=3, prompt_tokens=60, max_new_tokens=8, quality_samples=2, quality_tokens=60,
                        quality_new_tokens=8, max_ppl_increase=None, min_rouge_l=None)
_BUILT: dict[str, tuple] = {}


def write_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer with 256 ids (3 specials + 253 byte symbols) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    specials = ["<unk>", "<s>", "</s>"]
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())[: 256 - len(specials)]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + symbols)}, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "add_bos_token": False,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )


def tiny_profile(model, fractions=FRACTIONS, keep=KEEP):
    from prefixkv.profile import Fingerprint, LayerKeep, RetentionProfile

    return RetentionProfile(Fingerprint.of(model.config), sink=4, calibrated={keep: LayerKeep(list(fractions), [0.0] * len(fractions))})


def tiny_model_folder(root: Path):
    """(model, folder): the seeded tiny Llama saved with a tokenizer (model uses the prefixkv attention)."""
    folder = root / "tiny-llama"
    model = tiny_llama(layers=LAYERS)
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        write_tokenizer(folder)
    model.prefixkv_source = str(folder)
    return model, folder


def tiny_engine(root: Path):
    """(engine_dir, model, profile): the tiny engine, built (and validated) once per session."""
    key = str(root)
    if key not in _BUILT:
        from prefixkv.engines.validate import ValidationConfig
        from prefixkv.pipeline import BuildConfig, build_engine

        model, folder = tiny_model_folder(root)
        profile = tiny_profile(model)
        config = BuildConfig(str(folder), root / "tiny-engine", KEEP, profile=profile, validation=ValidationConfig(**SMALL_VALIDATION))
        result = build_engine(config, model=model, log=lambda m: None)
        assert result.passed, result.validation
        _BUILT[key] = (result.path, model, profile)
    return _BUILT[key]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model runs fastest on one thread (and the machine is shared); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_torch_thread):
    return tiny_engine(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def runners(tiny):
    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner
    from prefixkv.engines.torch import TorchRunner

    engine_dir, model, profile = tiny
    return OnnxRuntimeRunner(engine_dir, threads=1), TorchRunner(model, engine_dir, profile=profile, keep_fraction=KEEP, method="prefixkv")


def _batch(runner, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return runner.pad([list(rng.integers(3, 256, n)) for n in lengths])


def _prefill_matches(engine, reference, lengths, ties: bool = False):
    """Prefill a padded batch of ``lengths`` on both: logits within 1e-4, every layer's kept
    positions and validity identical, kept keys/values within 1e-5.  ties: a row may keep
    other positions when the reference scores them the same (``validate.tied_rows``: equal
    sorted scores within 1e-5); its keys/values are then not compared.
    -> (ref_logits, state, ref_state, tied (layer, row) pairs)."""
    from prefixkv.engines.validate import prompt_scores, tied_rows

    ids, mask = _batch(engine, lengths)
    logits, state = engine.prefill(ids, mask)
    ref_logits, ref_state = reference.prefill(ids, mask)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    tied = []
    for l, layer in enumerate(ref_state.cache.layers):
        got = engine.cache(state, l)
        rows = list(range(len(lengths)))
        if ties:
            scores = prompt_scores(ref_state, mask)
            rows_tied, other = tied_rows(got["positions"], layer.positions.numpy(), scores[l])
            assert not other, (l, other)
            tied += [(l, row) for row in rows_tied]
            rows = [row for row in rows if row not in rows_tied]
        np.testing.assert_array_equal(got["positions"][rows], layer.positions.numpy()[rows])
        np.testing.assert_array_equal(got["valid"], layer.valid.numpy())
        held = layer.valid.numpy()[rows][:, None, :, None]  # empty slots' contents mean nothing
        np.testing.assert_allclose(got["key"][rows] * held, layer.keys.numpy()[rows] * held, atol=1e-5)
        np.testing.assert_allclose(got["value"][rows] * held, layer.values.numpy()[rows] * held, atol=1e-5)
    return ref_logits, state, ref_state, tied


def phase(path, name: str):
    """The decoder's graph of phase ``name`` ("prefill" or "decode"), its own values' "PHASE/"
    prefix taken off (the main graph's names: present.0.key, logits, ...)."""
    import onnx

    from prefixkv.exporter.onnx import phase_graph

    graph = onnx.GraphProto()
    graph.CopyFrom(phase_graph(onnx.load(str(path), load_external_data=False), name))
    strip = (lambda v: v[len(name) + 1:] if v.startswith(name + "/") else v)
    for node in graph.node:
        node.input[:] = [strip(v) for v in node.input]
        node.output[:] = [strip(v) for v in node.output]
    for value in graph.output:
        value.name = strip(value.name)
    return graph


def test_prefill_matches_reference_with_left_padding(runners):
    _prefill_matches(*runners, [70, 41, 9])


def test_layer_lengths_follow_the_profile_constants(runners):
    """K_l = round(fraction_l x prompt_len) for every layer, computed in the graph."""
    from prefixkv.compaction import keep_counts

    engine, _ = runners
    for n in (8, 33, 100):
        ids, mask = _batch(engine, [n])
        _, state = engine.prefill(ids, mask)
        widths = [engine.cache(state, l)["key"].shape[2] for l in range(LAYERS)]
        expected = [int(keep_counts(torch.tensor([n]), f, 4, True)[0]) for f in FRACTIONS]
        assert widths == expected
        assert engine.layer_lengths(state)[:, 0].tolist() == expected


def test_one_decoder_graph_holds_the_weights_once(tiny):
    """decoder.onnx: chunks of C tokens over per-layer buffers, one fused attention per layer
    writing into the present buffers and returning its probabilities in the scored layers,
    their summed attention mass out side by side; every layer's slots in one positions/valid
    pair; compact.onnx: the per-layer TopK compaction; one weights file in the folder."""
    import onnx

    engine_dir = tiny[0]
    graph = onnx.load(str(engine_dir / "decoder.onnx"), load_external_data=False).graph
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"] == dims["position_ids"] == ["batch", "chunk"]
    assert dims["score_from"] == []  # a scalar: the chunk's first scored row
    # K/V are fixed-capacity buffers per layer; one positions/valid pair marks every layer's slots in use
    assert [dims[f"past.{l}.key"][2] for l in range(LAYERS)] == [f"cache_capacity_{l}" for l in range(LAYERS)]
    assert dims["past.positions"] == dims["past.valid"] == ["batch", "past_slots"] and dims["past_widths"] == [LAYERS]
    assert not any(f"past.{l}.positions" in dims or f"past.{l}.valid" in dims for l in range(LAYERS))
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in graph.output}
    assert list(outputs)[:3] == ["logits", "present.positions", "present.valid"]
    assert outputs["present.2.key"] == ["batch", 2, "cache_capacity_2", 16]
    assert outputs["present.positions"] == outputs["present.valid"] == ["batch", "present_slots"]
    # layer 1 keeps everything: no scores, and its attention returns no probabilities; one mass output
    assert [n for n in outputs if n.startswith("mass")] == ["mass"] and outputs["mass"] == ["batch", "scored_slots"]
    # the weights once, in the main graph; its one If runs a prefill chunk's graph or a decode step's
    assert [n.op_type for n in graph.node][-1] == "If" and not any(phase(engine_dir / "decoder.onnx", p).initializer
                                                                    for p in ("prefill", "decode"))
    # and the fused attention's rotary tables: cos and sin, a row per position of the context
    config = tiny[1].config
    tables = [t for t in graph.initializer if len(t.dims) == 2 and list(t.dims) == [config.max_position_embeddings, 8]]
    assert len(tables) == 2
    assert sum(int(np.prod(t.dims)) for t in graph.initializer if len(t.dims) == 2 and t not in tables) == sum(
        p.numel() for p in tiny[1].parameters() if p.dim() == 2)
    for name, qk_layers in (("prefill", [2, 0, 2]), ("decode", [0, 0, 0])):
        fused = [n for n in phase(engine_dir / "decoder.onnx", name).node
                 if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
        qk = [{a.name: a.i for a in n.attribute}.get("qk_output", 0) for n in fused]
        assert qk == qk_layers and [len(n.output) for n in fused] == [4 if q else 3 for q in qk_layers]
        assert [list(n.output[1:3]) for n in fused] == [[f"present.{l}.key", f"present.{l}.value"] for l in range(LAYERS)]
        assert [list(n.input[3:5]) for n in fused] == [[f"past.{l}.key", f"past.{l}.value"] for l in range(LAYERS)]
    compact = onnx.load(str(engine_dir / "compact.onnx"), load_external_data=False).graph
    assert {"TopK", "GatherElements"} <= {n.op_type for n in compact.node}
    assert sum(int(np.prod(t.dims)) for t in compact.initializer) < 1000  # constants only
    assert sorted(p.name for p in engine_dir.glob("*.data")) == ["decoder.onnx.data"]
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert set(manifest["graphs"]) == {"decoder", "compact"} and manifest["schema_version"] == 7


def test_a_decode_step_computes_no_attention_mass(runners):
    """The decoder's one If (every row's last token within its prompt) runs a prompt chunk
    through the prefill graph: its scored layers' attention returns the probabilities, one
    MatMul per layer sums them, and the mass goes out; nothing masks its attention (a
    prompt's slots are all in use).  A decode step runs the decode graph: every layer's
    attention takes the bias that masks the empty slots, none returns probabilities, and the
    mass is empty (B, 0), not read by the runner.  The chunked tests check the prefill
    graph's mass against the reference."""
    import onnx

    engine = runners[0]
    path = engine.engine_dir / "decoder.onnx"
    main = onnx.load(str(path), load_external_data=False).graph
    branch = next(n for n in main.node if n.op_type == "If")
    producers = {o: n for n in main.node for o in n.output}
    chain, value = [], branch.input[0]
    while value in producers and producers[value].op_type != "Constant":
        chain.append(producers[value])
        value = producers[value].input[0]
    assert [n.op_type for n in chain] == ["Cast", "ReduceMin", "Cast", "Less", "Gather"]  # all rows, each < its prompt
    gather = chain[-1]
    last = onnx.numpy_helper.to_array(producers[gather.input[1]].attribute[0].t)
    assert gather.input[0] == "position_ids" and int(last) == -1 and gather.attribute[0].i == 1  # position_ids[:, -1]
    assert chain[-2].input[1] == "prompt_lengths" and chain[1].attribute[0].i == 0  # ReduceMin over all rows, keepdims 0
    prefill, decode = phase(path, "prefill"), phase(path, "decode")
    attention = {name: [n for n in g.node if n.op_type == "GroupQueryAttention"] for name, g in
                 (("prefill", prefill), ("decode", decode))}
    assert [len(n.input) > 10 and bool(n.input[10]) for n in attention["decode"]] == [True] * LAYERS  # the bias
    assert [len(n.input) > 10 and bool(n.input[10]) for n in attention["prefill"]] == [False] * LAYERS
    probabilities = {n.output[3] for n in attention["prefill"] if len(n.output) == 4}
    assert len(probabilities) == 2 and not any(len(n.output) == 4 for n in attention["decode"])  # layers 0 and 2
    readers = [n for n in prefill.node if set(n.input) & probabilities]
    assert [n.op_type for n in readers] == ["MatMul", "MatMul"]
    producers = {o: n.op_type for n in decode.node for o in n.output}
    assert producers["mass"] == "ConstantOfShape" and "ReduceSum" not in producers.values()
    shapes, step = [], engine._step

    def recorded(*args):
        out = step(*args)
        shapes.append(tuple(out[2].shape()))
        return out

    engine._step = recorded
    try:
        logits, state = engine.prefill(*_batch(engine, [30]))
        engine.decode(state, logits.argmax(-1))
    finally:
        del engine._step
    assert shapes == [(1, 2 * 30), (1, 0)]


def test_the_decoder_runs_onnxruntime_fused_norms(tiny):
    """Each of the 2 x layers + 1 RMSNorms is one ONNX Runtime kernel (the residual add fused
    where one precedes it), found by onnxscript's ORT rules and recorded in the graph's
    metadata; the reference comparisons above run on this graph."""
    import onnx

    from prefixkv.engine_folder import FUSIONS_KEY

    proto = onnx.load(str(tiny[0] / "decoder.onnx"), load_external_data=False)
    for name in ("prefill", "decode"):
        ops = [n.op_type for n in phase(tiny[0] / "decoder.onnx", name).node]
        plain, skip = ops.count("SimplifiedLayerNormalization"), ops.count("SkipSimplifiedLayerNormalization")
        assert plain + skip == 2 * LAYERS + 1
        assert skip == 2 * LAYERS - 1  # every norm but the first layer's input norm and the final norm
        assert "ReduceMean" not in ops and "Reciprocal" not in ops  # no unfused norm left
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta[FUSIONS_KEY] == (f"rms_normalization={2 * LAYERS + 1},skip_rms_normalization={2 * LAYERS - 1},"
                                 f"rotary_in_attention={LAYERS}")


def test_the_fused_attention_rotates_the_query_and_keys(tiny):
    """Llama's half-split rotation is the one GroupQueryAttention implements: every layer's op
    rotates (``do_rotary``, its cos/sin tables and rows given), and no rotation op is left in
    the graph (``rotate_half``'s Neg).  q, k and v come from one projection, and gate and up
    from another.  The chunked and lockstep tests check the result."""
    import onnx

    for name in ("prefill", "decode"):
        graph = phase(tiny[0] / "decoder.onnx", name)
        attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
        assert len(attention) == LAYERS
        for node in attention:
            assert {a.name: a.i for a in node.attribute}.get("do_rotary") == 1
            assert all(node.input[i] for i in (7, 8, 9))  # cos_cache, sin_cache, position_ids
            assert not node.input[1] and not node.input[2]  # [q | k | v] packed into the query input
        # per layer: [q | k | v], o, [gate | up], down, and (prefill) the mass MatMul of a scored layer; + the head
        matmuls = [n for n in graph.node if n.op_type in ("MatMul", "Gemm")]
        assert len(matmuls) <= (5 if name == "prefill" else 4) * LAYERS + 1
        assert "Neg" not in [n.op_type for n in graph.node]


def test_a_full_cache_engine_has_no_mass_no_rule_and_matches_the_reference(tmp_path, tiny):
    """Keep 1 (every layer keeps everything; the accumulated score, whose rows are all of
    them): the decoder returns no mass and runs no decode rule (no ranks: the slots go out
    as the Concat appended them), and the engine builds and validates against the PyTorch
    reference, graph and greedy lockstep, over more than one prefill chunk.  Its layers'
    slots are the same ones, so the graph takes one set of them (no Split) and gives every
    layer's attention one bias and one pair of lengths; a batch of two prompts of different
    lengths (the shorter row's slots right-aligned, with empty ones before them) decodes as
    each prompt alone, through the buffer growth that follows the prefill, as the two
    prompts prefilled alone and merged, as rows leaving and joining a running batch, and
    through the in-flight batching scheduler (``engines/batching.py``)."""
    import onnx

    from prefixkv.engine_folder import SLOTS_KEY
    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner
    from prefixkv.engines.validate import ValidationConfig
    from prefixkv.pipeline import BuildConfig, build_engine

    model, folder = tiny_model_folder(tmp_path)
    profile = tiny_profile(model, fractions=[1.0] * LAYERS, keep=1.0)
    config = BuildConfig(str(folder), tmp_path / "engine", 1.0, profile=profile,
                         validation=ValidationConfig(**SMALL_VALIDATION, prefill_chunk=16))
    result = build_engine(config, model=model, log=lambda m: None)
    assert result.passed, result.validation
    main = onnx.load(str(result.path / "decoder.onnx"), load_external_data=False).graph
    outputs = [o.name for o in main.output]
    inputs = [i["name"] for i in json.loads((result.path / "manifest.json").read_text())["graphs"]["decoder"]["inputs"]]
    assert "input_ids" in inputs and "past_widths" in inputs  # the manifest's records, read by name
    assert "mass" not in outputs and "score_from" not in inputs
    # one graph for prompt chunks and decode steps alike (no bias, no probabilities: the phases are
    # the same), so no If
    proto = onnx.load(str(result.path / "decoder.onnx"), load_external_data=False)
    assert "If" not in {n.op_type for n in main.node}
    assert phase(result.path / "decoder.onnx", "prefill").node == phase(result.path / "decoder.onnx", "decode").node == main.node
    assert {p.key: p.value for p in proto.metadata_props}[SLOTS_KEY] == "shared"
    graph = main
    producers = {o: n for n in graph.node for o in n.output}
    assert producers["present.positions"].op_type == "Where" and producers["present.valid"].op_type == "Or"
    ops = [n.op_type for n in graph.node]
    assert "CumSum" not in ops and ops.count("GatherElements") == 1  # no decode rule; the chunk's positions placed
    readers = {}
    for node in graph.node:
        for value in node.input:
            readers.setdefault(value, []).append(node.op_type)
    assert "Split" not in readers["past.positions"] + readers["past.valid"]
    cast = next(n for n in graph.node if n.op_type == "Cast" and n.input[0] == "past.valid")
    assert readers[cast.output[0]] == ["ReduceSum"]  # each row's entries: its length for the fused attention
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attention) == LAYERS
    # seqlens_k (per row) and total_sequence_length: one tensor for every layer; no attention bias
    for index in (5, 6):
        assert len({n.input[index] for n in attention}) == 1
    assert all(len(n.input) <= 10 or not n.input[10] for n in attention)

    runner = OnnxRuntimeRunner(result.path, threads=1, prefill_chunk=16)
    prompts = [list(range(3, 23)), list(range(5, 42))]  # 20 and 37 tokens
    tokens = np.array([[7, 9], [11, 4], [6, 6], [2, 30], [8, 3], [5, 12], [9, 9], [4, 17], [13, 2], [3, 8]])
    logits, state = runner.prefill(*runner.pad(prompts))
    assert state.shared and state.slots[0].shape() == [2, 37] and state.widths.tolist() == [37] * LAYERS
    batched = [logits]
    for step in tokens:
        logits, state = runner.decode(state, step)
        batched.append(logits)
    assert state.slots[0].shape() == [2, 37 + len(tokens)]
    for row, prompt in enumerate(prompts):
        logits, alone = runner.prefill(*runner.pad([prompt]))
        assert alone.slots[0].shape() == [1, len(prompt)]
        np.testing.assert_allclose(batched[0][row], logits[0], atol=1e-4)
        for step, expected in zip(tokens[:, row], batched[1:]):
            logits, alone = runner.decode(alone, np.array([step]))
            np.testing.assert_allclose(expected[row], logits[0], atol=1e-4)
    # the prompts prefilled alone and merged into one batch (the slots compacted once for all
    # layers) decode as the batch
    merged = runner.merge([(runner.prefill(*runner.pad([prompt]))[1], [0]) for prompt in prompts])
    assert merged.shared and merged.slots[0].shape() == [2, 37] and merged.widths.tolist() == [37] * LAYERS
    # each row's entries first, its empty slots after them (the fused attention's per-row lengths)
    positions, valid = merged.layers()[0][2:]
    assert valid.sum(-1).tolist() == [20, 37] and valid[0, :20].all() and not valid[0, 20:].any()
    assert positions[0, :20].tolist() == list(range(20)) and (positions[0, 20:] == -1).all()
    for step, expected in zip(tokens, batched[1:]):
        logits, merged = runner.decode(merged, step)
        np.testing.assert_allclose(logits, expected, atol=1e-4)
    # each step wrote the shorter row's token right after its entries, not at the slots' end
    positions, valid = merged.layers()[0][2:]
    held = 20 + len(tokens)
    assert positions[0, :held].tolist() == list(range(held)) and not valid[0, held:].any()
    assert positions[1].tolist() == list(range(37 + len(tokens)))
    # a row leaves the running batch (its grown buffer, free slots and the other row's empty ones
    # dropped) and a freshly prefilled one joins it, as the in-flight batching merges them
    extra = np.array([[5, 8], [12, 3], [7, 7]])
    joined = runner.merge([(runner.merge([(state, [1])]), [0]), (runner.prefill(*runner.pad([prompts[0]]))[1], [0])])
    assert joined.shared and joined.widths.tolist() == [37 + len(tokens)] * LAYERS
    _, first = runner.prefill(*runner.pad([prompts[1]]))
    for step in tokens[:, 1]:
        _, first = runner.decode(first, np.array([step]))
    _, second = runner.prefill(*runner.pad([prompts[0]]))
    for step in extra:
        logits, joined = runner.decode(joined, step)
        alone_first, first = runner.decode(first, step[:1])
        alone_second, second = runner.decode(second, step[1:])
        np.testing.assert_allclose(logits, np.concatenate([alone_first, alone_second]), atol=1e-4)
    # the in-flight batching scheduler on the shared slots: five requests, at most three rows at
    # once, two submitted while the first ones run, so rows leave and join a running batch;
    # every request's tokens are its prompt's alone
    from prefixkv.engines.base import GenerationConfig
    from prefixkv.engines.batching import BatchConfig, Batcher, Request

    requests = [list(range(3, 23)), list(range(5, 42)), [9, 4, 17, 3], list(range(40, 10, -1)), [6] * 11]
    configs = [GenerationConfig(max_new_tokens=n, ignore_eos=True) for n in (6, 2, 9, 4, 7)]
    each = [runner.generate_ids([ids], c)[0].token_ids for ids, c in zip(requests, configs)]
    done = {}
    batcher = Batcher(runner, BatchConfig(max_batch_size=3))
    submit = lambda i: batcher.submit(Request(requests[i], configs[i], on_done=lambda g, e, i=i: done.setdefault(i, (g, e))))
    for i in range(3):
        submit(i)
    for _ in range(3):
        batcher.step()
    assert batcher.state is not None and batcher.state.shared
    submit(3), submit(4)
    batcher.drain()
    assert [done[i][1] for i in range(5)] == [None] * 5
    assert [done[i][0].token_ids for i in range(5)] == each
    assert batcher.stats.most_active == 3
    # a state is its engine's: slots side by side do not feed an engine whose layers share theirs, nor the reverse
    other = OnnxRuntimeRunner(tiny[0], threads=1)
    _, side_by_side = other.prefill(*other.pad([prompts[0]]))
    with pytest.raises(ValueError, match="its layers' slots are side by side, the engine's layers share theirs"):
        runner.decode(side_by_side, np.array([3]))
    with pytest.raises(ValueError, match="its layers' slots are side by side, the engine's layers share theirs"):
        runner.merge([(side_by_side, [0])])
    with pytest.raises(ValueError, match="its layers' slots are side by side, the engine's layers share theirs"):
        runner.kept_positions(side_by_side)
    with pytest.raises(ValueError, match="its layers share their slots, the engine's do not"):
        other.decode(alone, np.array([3]))


def test_the_slot_bookkeeping_runs_once_for_all_layers(tiny):
    """Every layer's slots come in side by side, in one positions/valid pair: one Split each
    (sizes from the past_widths input (L,), so no Shape op reads a past tensor) hands the
    layers' parts to the Concat that appends the chunk's slots to each; the decode rule and
    the bias run one set of ops per step, not one per layer; the evicted pair goes out as it
    is.  The fused attention's lengths come from one Split each, not a Gather per layer.
    Both phases (a prompt chunk's has no bias)."""
    for name in ("prefill", "decode"):
        graph = phase(tiny[0] / "decoder.onnx", name)
        readers = {}
        for node in graph.node:
            for value in node.input:
                readers.setdefault(value, []).append(node.op_type)
        assert readers["past.valid"] == ["Split"]
        assert sorted(readers["past.positions"]) in (["Split"], ["Shape", "Split"])  # a Shape may read the batch size
        producers = {o: n for n in graph.node for o in n.output}
        assert {producers[v].op_type for v in ("present.positions", "present.valid")} <= {"Where", "And", "Not", "Identity"}
        assert [n.op_type for n in graph.node].count("CumSum") <= 3  # the rule's ranks, the segments, the widths
        attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
        lengths = {producers[n.input[i]].name for n in attention for i in (5, 6)}  # seqlens_k, total_sequence_length
        assert len(lengths) == 2 and {producers[n.input[5]].op_type for n in attention} == {"Split"}
        assert "Gather" not in {producers[n.input[i]].op_type for n in attention for i in (5, 6)}
        biases = {n.input[10] for n in attention if len(n.input) > 10 and n.input[10]}
        assert len(biases) == (0 if name == "prefill" else len(attention))  # the decode phase: one per layer


def test_the_rotation_check_refuses_a_variant():
    """``half_rotation`` compares the model's own rotation with the op's at a few positions: an
    interleaved variant (pairs of neighbours rotated) keeps the graph's own rotation ops."""
    from conftest import tiny_llama

    from prefixkv.exporter.onnx import Decoder

    decoder = Decoder(tiny_llama())
    assert decoder.half_rotation()

    def interleaved(q, k, cos, sin):
        def rotate(x):
            pairs = x.reshape(*x.shape[:-1], -1, 2)
            return torch.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        return q * c + rotate(q) * s, k * c + rotate(k) * s

    decoder._rope = interleaved
    assert not decoder.half_rotation()


def test_the_rotary_table_is_the_model_rotation_by_position():
    """The fused attention's tables: row p holds cos/sin(p x theta^(-2i/D)) for the first D / 2
    frequencies (the tiny model: theta 10000, D 16).  A rotation whose values at a position
    depend on the call's longest position (as a long-rope rescaling does) has no table: the
    decoder then keeps the graph's own rotation."""
    from conftest import tiny_llama

    from prefixkv.exporter.onnx import Decoder

    decoder = Decoder(tiny_llama())
    cos, sin = decoder.rotary_table(512, torch.float32)
    assert cos.shape == sin.shape == (512, 8) and cos.dtype == torch.float32
    angles = torch.arange(512, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    # float32 angles: up to 512 x 1 rounds to within 3e-5
    torch.testing.assert_close(cos.double(), torch.cos(angles), atol=3e-5, rtol=0)
    torch.testing.assert_close(sin.double(), torch.sin(angles), atol=3e-5, rtol=0)
    assert decoder.rotary_table(4, torch.float16)[0].dtype == torch.float16

    rope = decoder.rope

    def rescaled(hidden, position_ids):  # the angles scaled down once the call reaches position 256
        scale = 0.5 if int(position_ids.max()) >= 256 else 1.0
        return rope(hidden, (position_ids * scale).long())

    decoder.rope = rescaled
    assert decoder.rotary_table(512, torch.float32) is None
    assert decoder.rotary_table(200, torch.float32) is not None


@pytest.mark.parametrize("chunk", [1, 7, 64, 150])
def test_chunked_prefill_matches_the_reference(tiny, runners, chunk):
    """A padded batch longer than several chunks: kept positions identical in every layer,
    logits and kept keys/values within the tolerances, whatever the chunk size."""
    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner

    engine = OnnxRuntimeRunner(tiny[0], threads=1, prefill_chunk=chunk)
    reference = runners[1]
    ref_logits, state, ref_state, _ = _prefill_matches(engine, reference, [150, 97])
    logits, state = engine.decode(state, ref_logits.argmax(-1))
    ref_logits, _ = reference.decode(ref_state, ref_logits.argmax(-1))
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_the_whole_context_matches_the_reference(tiny, runners):
    """A prompt of the tiny model's full context less one (511 tokens, two default chunks)
    and one decode step to the full context: kept positions identical in every layer and the
    logits within the tolerances.  SmolLM2's 8192 tokens: ``test_integration_engine``'s
    ``full_context`` test (``make test-full``)."""
    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner

    engine = OnnxRuntimeRunner(tiny[0], threads=1)
    reference = runners[1]
    assert engine.max_context == 512 and engine.prefill_chunk < engine.max_context - 1
    ref_logits, state, ref_state, _ = _prefill_matches(engine, reference, [engine.max_context - 1])
    logits, state = engine.decode(state, ref_logits.argmax(-1))
    ref_logits, _ = reference.decode(ref_state, ref_logits.argmax(-1))
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert int(state.positions[0]) == engine.max_context
    # the step's compaction gave free slots only up to the context (the rotary tables' rows)
    assert max(state.kv[2 * l].shape()[2] for l in range(engine.layers)) <= engine.max_context
    assert (engine.cache_slack, engine._free_slots(100), engine._free_slots(500), engine._free_slots(512)) == (64, 64, 12, 0)
    with pytest.raises(ValueError, match="row 0 holds the engine's whole context of 512 tokens"):
        engine.decode(state, logits.argmax(-1))


def test_a_runners_own_states_skip_the_checks_until_a_buffer_or_the_context_ends(tiny, runners):
    """A state that this runner's own step returned, with its buffers kept, is decoded
    without ``_check_state`` (at batch 1 its numpy calls were a third of the step's Python),
    for as many steps as its buffers' free slots and the context allow: 500 prompt tokens of
    the tiny engine's 512 give 12 steps, checked at the first (the prefill's state), the
    second (the first step compacted into new buffers) and the thirteenth, refused in one
    line.  The logits are the reference's all the way; a state made by ``replace`` or given
    to another runner is checked."""
    from dataclasses import replace

    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner

    engine, reference = OnnxRuntimeRunner(tiny[0], threads=1), runners[1]
    ids, mask = _batch(engine, [500])
    logits, state = engine.prefill(ids, mask)
    ref_logits, ref_state = reference.prefill(ids, mask)
    checked, check = [], engine._check_state
    engine._check_state = lambda s, batch: checked.append(int(s.positions[0])) or check(s, batch)
    steps = 0
    with pytest.raises(ValueError, match="^row 0 holds the engine's whole context of 512 tokens") as err:
        while True:
            token = logits.argmax(-1)
            logits, state = engine.decode(state, token)
            ref_logits, ref_state = reference.decode(ref_state, token)
            np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
            steps += 1
    assert steps == 12 and checked == [500, 501, 512] and "\n" not in str(err.value)
    logits, state = engine.prefill(ids, mask)
    for _ in range(3):
        logits, state = engine.decode(state, logits.argmax(-1))
    assert state.unchecked_steps[:2] == (engine, 512 - 503) and state.unchecked_steps[2] is state.kv
    checked.clear()
    logits, state = engine.decode(replace(state), logits.argmax(-1))  # a state made by hand: checked
    other = OnnxRuntimeRunner(tiny[0], threads=1)
    other._check_state = lambda s, batch: checked.append("other") or check(s, batch)
    logits, state = other.decode(state, logits.argmax(-1))  # engine's state, another runner: checked, bound there
    assert state.binding.session is other.sessions["decoder"]
    with pytest.raises(ValueError, match="tokens for a state of 1 rows"):  # the wrong batch: checked
        other.decode(state, np.zeros(2, np.int64))
    assert checked == [503, "other", "other"]
    # a short prompt runs into its buffers' free slots first: checked at the prefill's state,
    # at the step that compacts and at the step after it (new buffers), nowhere else
    logits, state = engine.prefill(*_batch(engine, [100]))
    ref_logits, ref_state = reference.prefill(*_batch(engine, [100]))
    compacted, compact = [], engine._compact
    engine._compact = lambda s, full: compacted.append(int(s.positions[0])) or compact(s, full)
    checked.clear()
    for _ in range(150):
        token = logits.argmax(-1)
        logits, state = engine.decode(state, token)
        ref_logits, ref_state = reference.decode(ref_state, token)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert len(compacted) >= 3 and compacted[0] == 100
    assert checked == sorted({100} | {p for c in compacted for p in (c, c + 1)})


@pytest.mark.parametrize("scorer, params", [("window", {"window": 20, "pool": 3}), ("last-query", {}), ("key-norm", {})])
def test_other_scorers_chunked_match_the_reference(tmp_path, scorer, params):
    """Engines whose score needs some rows (window, last-query) or none (key-norm): chunks of
    7 tokens, so the window's rows start inside a chunk; kept positions identical to the
    reference in every layer, the decoder's inputs say which.  key-norm: the same token's
    layer-0 keys differ only by rotation, so their norms tie up to rounding, and a tied
    choice is excused (and must occur in this batch of random bytes, or the test checks
    nothing of it)."""
    import onnx

    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner
    from prefixkv.engines.torch import TorchRunner
    from prefixkv.engines.validate import ValidationConfig
    from prefixkv.pipeline import BuildConfig, build_engine

    model, folder = tiny_model_folder(tmp_path)
    profile = tiny_profile(model)
    profile.scorer, profile.scorer_params = scorer, params
    config = BuildConfig(str(folder), tmp_path / "engine", KEEP, profile=profile, validation=ValidationConfig(**SMALL_VALIDATION))
    result = build_engine(config, model=model, log=lambda m: None)
    assert result.passed, result.validation
    inputs = [i.name for i in onnx.load(str(result.path / "decoder.onnx"), load_external_data=False).graph.input]
    assert ("score_from" in inputs) == (scorer != "key-norm")
    meta = {p.key: p.value for p in onnx.load(str(result.path / "decoder.onnx"), load_external_data=False).metadata_props}
    # key-norm reads the rotated keys: the graph's own rotation, rounding as the reference's does
    assert ("rotary_in_attention=0" in meta["prefixkv.fusions"]) == (scorer == "key-norm")
    engine = OnnxRuntimeRunner(result.path, threads=1, prefill_chunk=7)
    reference = TorchRunner(model, result.path, profile=profile, keep_fraction=KEEP, method="prefixkv")
    ref_logits, state, ref_state, tied = _prefill_matches(engine, reference, [75, 38], ties=scorer == "key-norm")
    assert bool(tied) == (scorer == "key-norm") and all(l == 0 for l, _ in tied)
    if not tied:
        logits, _ = engine.decode(state, ref_logits.argmax(-1))
        np.testing.assert_allclose(logits, reference.decode(ref_state, ref_logits.argmax(-1))[0], atol=1e-4, rtol=1e-4)
        # chunks of 32 rows, more than the window's 20: the mass reads a chunk's last rows only,
        # and the 75-token prompt's scored rows start inside its second chunk (row 23 of 32)
        _prefill_matches(OnnxRuntimeRunner(result.path, threads=1, prefill_chunk=32), reference, [75, 38])


def test_prefill_chunk_is_checked(tiny):
    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner

    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="prefill_chunk must be a positive number of tokens"):
            OnnxRuntimeRunner(tiny[0], prefill_chunk=bad)


@pytest.mark.parametrize("slack", [64, 3])
def test_decode_budget_matches_reference_step_by_step(tiny, runners, slack):
    """Padded batch, 40 steps fed the same tokens: kept positions and their keys and values
    equal in every layer at every step, and the returned cache is always within the decode
    budget.  Slack 3: the runner compacts full buffers every few steps."""
    from prefixkv.compaction import decode_budget
    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner

    reference = runners[1]
    engine = OnnxRuntimeRunner(tiny[0], threads=1, cache_slack=slack)
    ids, mask = _batch(engine, [50, 23], seed=1)
    logits, state = engine.prefill(ids, mask)
    ref_logits, ref_state = reference.prefill(ids, mask)
    prompt_lengths = torch.tensor(mask.sum(-1))
    evictions = 0
    for step in range(40):
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
        for l, (a, b) in enumerate(zip(engine.kept_positions(state), reference.kept_positions(ref_state))):
            assert a.shape == b.shape, (step, l)
            np.testing.assert_array_equal(a, b)
            got, want = engine.cache(state, l), ref_state.cache.layers[l]
            held = want.valid.numpy()[:, None, :, None]
            np.testing.assert_allclose(got["key"] * held, want.keys.numpy() * held, atol=1e-5)
            np.testing.assert_allclose(got["value"] * held, want.values.numpy() * held, atol=1e-5)
        lengths = torch.tensor(engine.layer_lengths(state))
        seen = prompt_lengths + step
        for l, f in enumerate(FRACTIONS):
            cap, _ = decode_budget(prompt_lengths, seen, torch.tensor(f, dtype=torch.float32), 4, True, 25)
            assert bool((lengths[l] <= cap).all())
        tokens = ref_logits.argmax(-1)
        before = engine.layer_lengths(state)
        logits, state = engine.decode(state, tokens)
        ref_logits, ref_state = reference.decode(ref_state, tokens)
        evictions += int((engine.layer_lengths(state) <= before).sum())
    assert evictions > 0  # the rule did evict


def test_decode_writes_into_the_cache_buffers_in_place(runners):
    """The first decode step gives each layer a buffer with free slots; later steps write into
    that same memory (no copy of the cache) until it is full, on one IOBinding that binds
    the buffers once."""
    engine, _ = runners
    ids, mask = _batch(engine, [30])
    logits, state = engine.prefill(ids, mask)
    assert [state.kv[2 * l].shape()[2] for l in range(LAYERS)] == state.widths.tolist()
    assert state.slots[0].shape() == state.slots[1].shape() == [1, int(state.widths.sum())]
    logits, state = engine.decode(state, logits.argmax(-1))
    buffers = [buffer.data_ptr() for buffer in state.kv]
    capacity = [state.kv[2 * l].shape()[2] for l in range(LAYERS)]
    used = [int(w) - 1 for w in state.widths]  # the slots in use before this step
    assert capacity == [n + max(engine.cache_slack, n // 8) for n in used]
    binding = state.binding
    small = {name: held[0] for name, held in binding._owned.items()}  # the step's small inputs, bound once
    assert set(small) >= {"input_ids", "position_ids", "prompt_lengths", "past_widths"}
    for _ in range(5):
        logits, state = engine.decode(state, logits.argmax(-1))
    assert [buffer.data_ptr() for buffer in state.kv] == buffers and state.binding is binding
    assert {name: held[0] for name, held in binding._owned.items()} == small  # the same values, updated
    assert small["position_ids"].numpy().tolist() == [[int(state.positions[0]) - 1]]
    assert small["past_widths"].numpy().tolist() == [int(w) - 1 for w in state.widths]
    assert [state.kv[2 * l].shape()[2] for l in range(LAYERS)] == capacity
    assert state.widths.tolist() == [n + 6 for n in used]


def test_a_compaction_rebinds_only_the_full_layers(tiny, runners):
    """With 2 free slots per compaction, layers fill at different steps: a step compacts only
    the full layers, on the same IOBinding, giving only those new buffers, and every step's
    logits stay the reference's."""
    from prefixkv.engines.onnxruntime import OnnxRuntimeRunner

    engine, reference = OnnxRuntimeRunner(tiny[0], threads=1, cache_slack=2), runners[1]
    ids, mask = _batch(engine, [40])
    logits, state = engine.prefill(ids, mask)
    ref_logits, ref_state = reference.prefill(ids, mask)
    logits, state = engine.decode(state, ref_logits.argmax(-1))  # every layer gets its free slots
    ref_logits, ref_state = reference.decode(ref_state, ref_logits.argmax(-1))
    binding, partial = state.binding, 0
    for _ in range(14):
        full = [state.kv[2 * l].shape()[2] <= state.widths[l] for l in range(LAYERS)]
        before = [buffer.data_ptr() for buffer in state.kv]
        tokens = ref_logits.argmax(-1)
        logits, state = engine.decode(state, tokens)
        ref_logits, ref_state = reference.decode(ref_state, tokens)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)
        assert state.binding is binding
        after = [buffer.data_ptr() for buffer in state.kv]
        assert [a != b for a, b in zip(after, before)] == [f for f in full for _ in range(2)]
        partial += 0 < sum(full) < LAYERS
    assert partial, "no step compacted some layers but not others"


def test_batch_with_padding_equals_batch_one_per_row(runners):
    from prefixkv.engines.base import GenerationConfig

    engine, _ = runners
    rng = np.random.default_rng(3)
    prompts = [list(rng.integers(3, 256, n)) for n in (64, 17, 40)]
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    batched = engine.generate_ids(prompts, config)
    for row, prompt in enumerate(prompts):
        (single,) = engine.generate_ids([prompt], config)
        assert batched[row].token_ids == single.token_ids
        ids, mask = engine.pad(prompts)
        _, state = engine.prefill(ids, mask)
        _, alone = engine.prefill(*engine.pad([prompt]))
        for a, b in zip(engine.kept_positions(state), engine.kept_positions(alone)):
            np.testing.assert_array_equal(a[row][a[row] >= 0], b[0][b[0] >= 0])


def test_unsupported_model_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    from prefixkv.exporter.onnx import Decoder, ExportError

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ExportError, match="Llama-family"):
        Decoder(model)


def test_gemma_engine_matches_the_reference(tmp_path):
    """A tiny Gemma (embedding scale inside embed_tokens, GeLU MLP, (1 + w) RMSNorm) through the
    same exporter: graph, greedy lockstep and quality checks pass against the reference."""
    from transformers import GemmaConfig, GemmaForCausalLM

    import prefixkv
    from prefixkv.engines.validate import ValidationConfig
    from prefixkv.pipeline import BuildConfig, build_engine

    torch.manual_seed(0)
    config = GemmaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = GemmaForCausalLM(config).eval()
    folder = tmp_path / "tiny-gemma"
    model.save_pretrained(folder)
    write_tokenizer(folder)
    prefixkv.enable(model)
    model.prefixkv_source = str(folder)  # what load_model records
    config = BuildConfig(str(folder), tmp_path / "engine", KEEP, profile=tiny_profile(model),
                         validation=ValidationConfig(**SMALL_VALIDATION))
    result = build_engine(config, model=model, log=lambda m: None)
    assert result.passed, result.validation
    assert result.validation["checks"]["graph"]["kept_positions_identical"]


def test_a_state_built_from_numpy_keeps_its_buffers_alive(runners):
    """Decode from caches the caller made (numpy-backed OrtValues with free slots), dropping
    every reference but the state's: the buffers written in place stay valid."""
    import gc

    import onnxruntime as ort

    from prefixkv.engines.onnxruntime import OnnxRuntimeState

    engine, reference = runners
    ids, mask = _batch(engine, [45])
    logits, state = engine.prefill(ids, mask)
    ref_logits, ref_state = reference.prefill(ids, mask)
    for step in range(8):
        if step == 2:  # now with free slots: rebuild from copies the state alone owns
            kv = [ort.OrtValue.ortvalue_from_numpy(np.array(v.numpy(), copy=True)) for v in state.kv]
            slots = [ort.OrtValue.ortvalue_from_numpy(np.array(v.numpy(), copy=True)) for v in state.slots]
            state = OnnxRuntimeState(kv, slots, state.widths.copy(), state.positions.copy(), state.prompt_lengths.copy())
            del kv, slots
            gc.collect()
        tokens = ref_logits.argmax(-1)
        logits, state = engine.decode(state, tokens)
        ref_logits, ref_state = reference.decode(ref_state, tokens)
        gc.collect()
        np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_a_state_whose_parts_disagree_is_refused_in_one_line(runners):
    """Widths that are not the slots' would split every layer's slots at the wrong places
    (silently, when they sum right): decode refuses such a state with one line, and the
    per-layer slots ``layers()`` hands out are read-only (the next step reads them)."""
    from dataclasses import replace

    engine, _ = runners
    ids, mask = _batch(engine, [45])
    logits, state = engine.prefill(ids, mask)
    swapped = state.widths.copy()
    swapped[[0, 2]] = swapped[[2, 0]]
    assert swapped.sum() == state.widths.sum() and not (swapped == state.widths).all()
    cases = {"holds": replace(state, widths=swapped),  # same sum: only the buffers' sizes tell
             "slots are": replace(state, widths=state.widths + 1),
             "not this engine's": replace(state, widths=state.widths[:-1]),
             "tokens for a state of 1 rows": state}
    for message, bad in cases.items():
        tokens = np.zeros(2 if bad is state else 1, np.int64)
        with pytest.raises(ValueError, match=message) as err:
            engine.decode(bad, tokens)
        assert "\n" not in str(err.value)
    _, _, positions, valid = state.layers()[0]
    with pytest.raises(ValueError, match="read-only"):
        positions[0, 0] = 7
    logits, state = engine.decode(state, logits.argmax(-1))  # the state itself still decodes
    assert np.isfinite(logits).all()
    # a step that kept its buffers (this one: the first step compacted into new ones) hands
    # their capacities on; a state made by ``replace`` reads its own
    assert state.capacity is None
    logits, state = engine.decode(state, logits.argmax(-1))
    assert state.capacity.tolist() == [state.kv[2 * l].shape()[2] for l in range(engine.layers)]
    assert replace(state, widths=state.widths).capacity is None


@pytest.mark.parametrize("lengths", [[60, 33], [60]])
def test_arrays_read_from_a_state_outlive_it(runners, lengths):
    """What ``numpy()`` gives for a state's cache stays valid after the state is dropped
    (validation compares outputs after the run that made them).  A merged batch (rows of
    different widths) and a decode-time compaction both build caches from numpy."""
    import gc

    engine, _ = runners
    ids, mask = _batch(engine, lengths)

    def read(state):
        return [v.numpy() for v in state.kv + state.slots]

    _, state = engine.prefill(ids, mask)
    views, want = read(state), [np.array(v, copy=True) for v in read(state)]
    for _ in range(3 * engine.cache_slack):  # past the free slots: decode compacts and rebuilds positions
        _, state = engine.decode(state, np.full(len(lengths), 7, np.int64))
    decoded, decoded_want = read(state), [np.array(v, copy=True) for v in read(state)]
    del state
    gc.collect()
    junk = [np.full((len(lengths), 64), -7, np.int64) for _ in range(4000)]  # reuse what was freed
    for got, expected in zip(views + decoded, want + decoded_want):
        np.testing.assert_array_equal(got, expected)
    del junk


def test_the_exporter_version_ignores_prose_but_not_code(tmp_path):
    """The engines' cache key: a docstring or comment edit keeps it, a code edit changes it."""
    from prefixkv.exporter.onnx import exporter_version, source_digest

    source = tmp_path / "m.py"
    digests = []
    for text in ('def f(x):\n    """Doubles."""\n    return 2 * x  # twice\n',
                 'def f(x):\n    """Doubles x, said at length."""\n    # a comment\n    return 2 * x\n',
                 'def f(x):\n    """Doubles."""\n    return 3 * x\n',
                 'def f(x):\n    return 2 * x\n'):
        source.write_text(text)
        digests.append(source_digest([source]))
    assert digests[0] == digests[1] == digests[3] != digests[2]
    assert exporter_version() == exporter_version() and "+" in exporter_version()
