"""onnxruntime-genai's decoder graph run from Python, step by step, the way the engine runner runs its own.

A ``genai-graph:FOLDER`` target of ``prefixkv.bench.paired``: the model onnxruntime-genai's
builder wrote (``genai_config.json`` names its graph, inputs and outputs), loaded with the
engine runner's session options and thread count and driven through ONNX Runtime's Python
IOBinding as ``OnnxRuntimeRunner`` drives a decoder: the key/value buffers bound once as
past and present (the fused attention writes into them in place, as onnxruntime-genai's
``past_present_share_buffer`` runs them), the token copied into a value bound once, the
attention mask (one column longer at every step) and the logits bound afresh, the greedy
token picked by numpy.  Our runner binds its growing slots afresh at every step too.

Why: onnxruntime-genai runs its loop in C++.  The graph against the host loop: this
target runs genai's own graph with a Python loop, so that paired with ``genai:FOLDER`` it
measures what a Python loop costs that graph, and paired with an engine it compares the two
graphs under the same kind of loop (``docs/engine_v2.md`` has the figures).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..engine_folder import EngineError
from ..engines.onnxruntime import DecoderBinding, session_options


@dataclass(frozen=True)
class GenaiLayout:
    """What the loop needs from a ``genai_config.json``: the decoder graph's file, its input and
    output names (``past``/``present``: patterns with ``%d`` for the layer) and cache shape."""

    graph: Path
    input_ids: str
    attention_mask: str
    past: tuple[str, str]
    present: tuple[str, str]
    logits: str
    layers: int
    kv_heads: int
    head_size: int
    context: int | None = None  # model.context_length: the most tokens its rotary caches cover

    def bound_inputs(self) -> set[str]:
        """The graph inputs the loop binds."""
        return {self.input_ids, self.attention_mask, *(p % l for p in self.past for l in range(self.layers))}

    @classmethod
    def read(cls, folder: str | Path) -> "GenaiLayout":
        folder = Path(folder)
        path = folder / "genai_config.json"
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise EngineError(f"{folder} has no genai_config.json (not an onnxruntime-genai model folder)") from None
        except json.JSONDecodeError as err:
            raise EngineError(f"{path} is not JSON: {err}") from None
        try:
            model = config["model"]
            decoder = model["decoder"]
            inputs, outputs = decoder["inputs"], decoder["outputs"]
            shared = config.get("search", {}).get("past_present_share_buffer", False)
            context = model.get("context_length")
            layout = cls(folder / decoder["filename"], inputs["input_ids"], inputs["attention_mask"],
                         (inputs["past_key_names"], inputs["past_value_names"]),
                         (outputs["present_key_names"], outputs["present_value_names"]), outputs["logits"],
                         int(decoder["num_hidden_layers"]), int(decoder["num_key_value_heads"]), int(decoder["head_size"]),
                         None if context is None else int(context))
        except KeyError as err:
            raise EngineError(f"{path} lacks the decoder's {err} (an onnxruntime-genai model of a decoder LLM?)") from None
        except (TypeError, ValueError) as err:
            raise EngineError(f"{path} has a bad value: {err}") from None
        patterns = [*layout.past, *layout.present]
        if not all(isinstance(p, str) and p.count("%d") == 1 for p in patterns):
            raise EngineError(f"{path}: each past and present name needs one %d for the layer, got {patterns}")
        if not shared:
            raise EngineError(f"{path}: the loop runs a model whose past and present share their buffers "
                              "(search.past_present_share_buffer, the builder's default for CPU)")
        if not layout.graph.is_file():
            raise EngineError(f"{path} names the graph {layout.graph.name}, which is not in {folder}")
        return layout


KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}  # ONNX Runtime's type names


class GenaiGraphLoop:
    """One prompt's greedy decoding with an onnxruntime-genai model's graph on ONNX Runtime's
    CPU provider (batch 1).  ``prefill(ids, steps)`` runs the prompt in one run into buffers
    with room for ``steps`` more tokens and returns its last logits (1, V); each
    ``decode(token)`` appends one token and returns its logits; ``run_seconds`` is the last
    ONNX Runtime run alone."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.layout = GenaiLayout.read(folder)
        self._ort = ort
        self.session = ort.InferenceSession(str(self.layout.graph), session_options(ort, threads),
                                            providers=["CPUExecutionProvider"])
        types = {i.name: i.type for i in self.session.get_inputs()}
        bound = self.layout.bound_inputs()
        if set(types) != bound:
            missing, extra = sorted(bound - set(types)), sorted(set(types) - bound)
            raise EngineError(f"{self.layout.graph}: genai_config.json names inputs the graph lacks ({', '.join(missing) or 'none'}) "
                              f"or the graph takes inputs the loop does not bind ({', '.join(extra) or 'none'})")
        kv_type = types[self.layout.past[0] % 0]
        if kv_type not in KV_DTYPES:
            raise EngineError(f"{self.layout.graph}: its cache input {self.layout.past[0] % 0} is {kv_type}, "
                              f"not one of {', '.join(KV_DTYPES)}")
        self._kv_dtype = KV_DTYPES[kv_type]
        self.binding = None
        self.length = 0  # tokens in the cache
        self.capacity = 0
        self.run_seconds = 0.0

    def prefill(self, ids, steps: int) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        if ids.shape[1] < 1 or steps < 0:
            raise ValueError(f"a prompt needs at least one token and steps >= 0, got {ids.shape[1]} and {steps}")
        lay = self.layout
        if lay.context is not None and ids.shape[1] + steps > lay.context:
            raise ValueError(f"{ids.shape[1]} prompt tokens and {steps} steps exceed the model's context of {lay.context}")
        self.capacity = ids.shape[1] + steps
        self.binding = DecoderBinding(self.session, "cpu", [lay.logits], self._ort)
        for layer in range(lay.layers):
            for past, present in zip(lay.past, lay.present):
                buffer = self._ort.OrtValue.ortvalue_from_shape_and_type(
                    (1, lay.kv_heads, self.capacity, lay.head_size), self._kv_dtype, "cpu")
                self.binding.io.bind_ortvalue_input(past % layer, buffer)
                self.binding.io.bind_ortvalue_output(present % layer, buffer)
        self.length = 0
        return self._run(ids)

    def decode(self, token) -> np.ndarray:
        if self.binding is None:
            raise ValueError("decode before prefill: no cache")
        if self.length >= self.capacity:
            raise ValueError(f"the cache holds its {self.capacity} tokens; prefill with more steps")
        return self._run(np.asarray(token, dtype=np.int64).reshape(1, 1))

    def _run(self, ids: np.ndarray) -> np.ndarray:
        self.length += ids.shape[1]
        lay, binding = self.layout, self.binding
        binding.set_inputs({lay.input_ids: ids, lay.attention_mask: np.ones((1, self.length), np.int64)})
        binding.io.bind_output(lay.logits, "cpu")
        start = time.perf_counter()
        self.session.run_with_iobinding(binding.io)
        self.run_seconds = time.perf_counter() - start
        logits = self._ort.OrtValue(binding.io.get_outputs_as_ortvaluevector()[0])
        return logits.numpy()[:, -1]
