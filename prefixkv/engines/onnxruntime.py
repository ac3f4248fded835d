"""ONNX Runtime backend: runs an engine folder's decoder and compact graphs.

    runner = OnnxRuntimeRunner("engines/smollm2-k20")            # CPU
    runner = OnnxRuntimeRunner(engine, providers=["cuda"])       # onnxruntime-gpu
    runner.generate("Hello", GenerationConfig(max_new_tokens=32))

The caches stay ``OrtValue``s between steps: decode binds the previous step's outputs as
its inputs through IOBinding, so caches never round-trip through numpy (nor leave the
GPU).  Only the logits are copied out.  A state keeps its decoder IOBinding, with the
key/value buffers bound once (a buffer is rebound only when a compaction replaces it), so
a decode step binds the token, its position, the layers' widths and one positions/valid
pair for all layers: about ten values, not four per layer.

Each layer's keys and values live in a buffer with free slots (see
``prefixkv.exporter.onnx.DecoderGraph``): a decode step binds the buffer as both its
past and its present, and the fused attention writes the new entry into it in place, while
the decode-phase rule marks evicted slots empty.  When a layer's buffer is full the runner
compacts it: drops the empty slots and adds max(``cache_slack``, entries / 8) free ones,
so a cache is copied once every ``cache_slack`` steps at most (a buffer never exceeds the
engine's ``max_context`` slots: the decoder's rotary tables have that many rows, and a row
at that context takes no further token); the prefill's compact caches
get their first buffers at the first decode step.  A decode step therefore consumes the state it is given: its buffers
are the new state's (the old one is marked consumed).  Imports numpy, onnxruntime and the
engine-folder check only (this module runs inside Triton's Python backend), and onnx when
loading a CPU decoder graph (``untie_packed_tables``).  On the CPU the memory the sessions
loaded, the packed weights, is collapsed into 2 MiB pages where the OS allows (``pages``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..defaults import CACHE_SLACK, PREFILL_CHUNK
from ..engine_folder import CACHE_LAYOUT_KEY, SCORE_ROWS_KEY, SLOTS_KEY, EngineError, onnx_graphs, read_manifest
from ..tokenizer import Tokenizer
from ..vision.data import ImageError
from ..vision.preprocess import ImageProcessor
from . import pages
from .base import Runner
from .compaction_graph import serialized
from .images import ImageInputs

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
GRAPHS = ("decoder", "compact")  # an ONNX Runtime engine's graphs
# used without being asked for when present (TensorRT only on request: it needs its own libraries)
DEFAULT_ORDER = ("CUDAExecutionProvider", "CPUExecutionProvider")


class ProviderError(ImportError):
    """A requested execution provider that this onnxruntime build does not have."""


def _import_ort():
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError("the onnxruntime backend needs ONNX Runtime: pip install onnxruntime (or onnxruntime-gpu for CUDA)") from err
    return onnxruntime


def resolve_providers(requested=None) -> list[str]:
    """Execution provider names for ``requested`` (None: CUDA when present, then CPU).

    ``requested``: names like "cpu", "cuda", "tensorrt" or full provider names, or a
    comma-separated string.  CPU is always appended as the fallback.
    """
    ort = _import_ort()
    available = ort.get_available_providers()
    if requested is None:
        chosen = [p for p in DEFAULT_ORDER if p in available]
    else:
        items = requested.split(",") if isinstance(requested, str) else list(requested)
        chosen = []
        for item in (i.strip() for i in items if i and i.strip()):
            name = PROVIDERS.get(item.lower(), item)
            if name not in available:
                fix = ("pip uninstall onnxruntime && pip install onnxruntime-gpu" if name != "CPUExecutionProvider"
                       else "reinstall onnxruntime")
                short = {v: k for k, v in PROVIDERS.items()}.get(name, name)
                raise ProviderError(
                    f"ONNX Runtime provider {name} ({short}) is not available (this onnxruntime has "
                    f"{', '.join(available)}); {fix}, or run on CPU (providers=['cpu'] / --providers cpu)"
                )
            chosen.append(name)
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen




def untie_packed_tables(path: Path) -> bytes | None:
    """The graph at ``path`` serialized so that each external-data table read by both a
    ``Gather`` and a ``Gemm``/``MatMul`` (a tied embedding and LM head) reaches the GEMM
    through a second initializer naming the same bytes of the same file; None when the
    graph has no such table (load it from its path).

    Why, on the CPU provider: ONNX Runtime packs a GEMM's constant weight into its own
    (anonymous) memory and then drops the mapping it packed from, unless another node still
    uses that initializer.  With one shared initializer the lookup keeps the whole table
    mapped and resident after packing read it (SmolLM2: 108 MiB of its 513 MiB); with two,
    the packed copy is all that stays, and the lookup's mapping pages in only the rows it
    reads.  The file and its contents are unchanged; nothing is copied.  Not done for the
    CUDA provider, which would then hold two copies of the table on the device."""
    try:
        import onnx  # only for this rewrite (the graph without its weights: a few MB)
    except ImportError:  # a runtime without onnx: the table stays resident, nothing else changes
        return None
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    nodes = [node for g in onnx_graphs(graph) for node in g.node]  # the decoder's phases' too
    lookups = {node.input[0] for node in nodes if node.op_type == "Gather"}
    tables = {i.name: i for i in graph.initializer
              if i.name in lookups and i.data_location == onnx.TensorProto.EXTERNAL}
    names = {i.name for i in graph.initializer} | {n for node in nodes for n in node.output}
    aliases: dict[str, str] = {}
    for node in nodes:
        if node.op_type not in ("Gemm", "MatMul"):
            continue
        for k, name in enumerate(node.input):
            if name not in tables:
                continue
            if name not in aliases:
                alias = name + ".packed"
                while alias in names:
                    alias += "_"
                copy = onnx.TensorProto()
                copy.CopyFrom(tables[name])  # dims, dtype and the external-data location, offset and length
                copy.name = alias
                graph.initializer.append(copy)
                names.add(alias)
                aliases[name] = alias
            node.input[k] = aliases[name]
    return model.SerializeToString() if aliases else None


class DecoderBinding:
    """The decoder's IOBinding for a run of steps: the key/value buffers bound as past and
    present (``bind_kv``), the outputs a step binds afresh (``fresh``) bound first, so that
    they are the first of the binding's outputs.

    On the CPU a step's small inputs (token, position, widths) are bound once, as values this
    binding owns, and a later step with the same shapes copies its numbers into them
    (``set_inputs``).  Binding a new value is cheap in itself, but the first binds after a
    decode run were not (the run leaves the CPU caches full of weights).  With the small
    inputs bound once, ``bench.point``'s step less its run went from 0.52-0.58 to 0.34-0.36 ms
    on SmolLM2 at 512 tokens (``docs/engine_v2.md``).  On another device a value bound from the CPU is
    copied there when it is bound, so each step binds its inputs afresh."""

    def __init__(self, session, device: str, fresh: list[str], ort):
        self.io, self.session = session.io_binding(), session
        self._device, self._ort = device, ort
        self._owned: dict[str, tuple] = {}  # name -> (OrtValue, shape, dtype), CPU only
        for name in fresh:
            self.io.bind_output(name, device)

    def bind_kv(self, kv: list, layers) -> None:
        """Bind layers' key/value buffers (``kv``: per layer key, value) as past and present."""
        for l in layers:
            for i, part in enumerate(("key", "value")):
                self.io.bind_ortvalue_input(f"past.{l}.{part}", kv[2 * l + i])
                self.io.bind_ortvalue_output(f"present.{l}.{part}", kv[2 * l + i])

    def set_inputs(self, inputs: dict) -> None:
        """Give the small inputs (name -> numpy array) their values for the next run."""
        for name, array in inputs.items():
            array = np.ascontiguousarray(array)
            if self._device != "cpu":
                self.io.bind_cpu_input(name, array)
                continue
            held = self._owned.get(name)
            if held is None or held[1] != array.shape or held[2] != array.dtype:
                value = self._ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, "cpu")
                held = self._owned[name] = (value, array.shape, array.dtype)
                value.update_inplace(array)
                self.io.bind_ortvalue_input(name, value)
            else:
                held[0].update_inplace(array)


@dataclass
class OnnxRuntimeState:
    """kv: per layer (key, value) OrtValues, flat: (B, Hkv, C_l, D) buffers whose first W_l
    slots are in use; slots: (positions, valid) OrtValues (B, sum of W_l), every layer's slots
    in use side by side, layer by layer (the decoder graph's layout), or, ``shared``, (B, W):
    the one set of slots every layer has (an engine whose layers never evict; its W_l are
    all W); widths: (L,) int64, the W_l; positions: (B,) next original position per row;
    prompt_lengths: (B,) real prompt lengths.  After prefill C_l == W_l (compact caches, no
    free slot).  ``binding``: the decoder's ``DecoderBinding`` with these buffers bound as
    past and present (None: bound at the next step), so that a decode step binds only what
    changes.  ``capacity``: (L,) each layer's buffer slots, read from ``kv`` by the first
    check (None until then); a decode step hands it to the next state while the buffers stay
    (``dataclasses.replace`` does not carry it; code that reassigns ``kv`` by hand sets it to
    None), so a step does not read every buffer's shape
    again: at batch 1 the step's Python is part of its time (``docs/engine_v2.md``).
    ``unchecked_steps``: set by a decode step, so that the next one skips the checks while the
    state's ``kv`` list and binding are that step's (a ``kv`` reassigned by hand is checked);
    the fields' arrays are the runner's: changing them in place is not checked."""

    kv: list
    slots: list
    widths: np.ndarray
    positions: np.ndarray
    prompt_lengths: np.ndarray
    binding: object = field(default=None, repr=False)
    shared: bool = False
    capacity: np.ndarray | None = field(default=None, init=False, repr=False)  # not carried by ``replace``
    # (the runner, the steps it may take before a buffer is full or the context ends, the kv
    # list): set by a decode step that kept its buffers, so that the next step skips the state's
    # checks while ``kv`` and ``binding`` are still that step's; not carried by ``replace``, so
    # a state made by hand is checked
    unchecked_steps: tuple | None = field(default=None, init=False, repr=False)

    def layers(self) -> list[tuple]:
        """Per layer (key, value) OrtValues and (positions, valid) numpy (B, W_l), read-only:
        on the CPU they are views of the slots the next step reads."""
        self.check_live()
        positions, valid = (v.numpy() for v in self.slots)
        for array in (positions, valid):
            array.setflags(write=False)
        if self.shared:
            return [(self.kv[2 * l], self.kv[2 * l + 1], positions, valid) for l in range(len(self.widths))]
        bounds = np.concatenate([[0], np.cumsum(self.widths)])
        return [(self.kv[2 * l], self.kv[2 * l + 1], positions[:, a:b], valid[:, a:b])
                for l, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]

    def check_live(self) -> None:
        """One line if a decode step or a merge consumed this state (its buffers are the newer state's)."""
        if self.kv is None:
            raise ValueError("this state was consumed by a later step or merge (which took its cache buffers); "
                             "use the state that step returned")

    def slot_count(self) -> int:
        """The slots' width: the sum of the W_l, or W where the layers share their slots."""
        return int(self.widths[0]) if self.shared else int(self.widths.sum())


def session_options(ort, threads: int | None = None):
    """The session options every prefixkv graph runs with.

    Priority-based execution order: ONNX Runtime's default order is built backwards from the
    graph outputs, so each layer's scoring and compaction (needed by no later layer) ran after
    the last layer and kept every layer's (heads x S x S) attention probabilities alive.
    Measured on SmolLM2 at 2048 prompt tokens: peak memory 5.7 GB -> 1.2 GB and the prefill
    twice as fast."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


class OnnxRuntimeRunner(Runner):
    """engine_dir: a folder written by ``prefixkv build``; providers: see ``resolve_providers``;
    threads: intra-op threads (None: ONNX Runtime's default); verify: hash every file on load;
    prefill_chunk: prompt tokens per decoder run (None: ``defaults.PREFILL_CHUNK``);
    huge_pages: on the CPU, the memory the decoder and compact sessions allocated while loading
    (the packed weights) collapsed into huge pages where the OS allows (``pages``; how many
    bytes moved: ``huge_page_bytes``; a vision engine's tower, loaded after them and run once
    per image, stays in small pages)."""

    name = "onnxruntime"

    def __init__(self, engine_dir: str | Path, providers=None, threads: int | None = None, verify: bool = True,
                 cache_slack: int = CACHE_SLACK, prefill_chunk: int | None = None, huge_pages: bool = True):
        ort = _import_ort()
        self.engine_dir = Path(engine_dir)
        self.run_seconds = 0.0  # the last decoder run's ONNX Runtime time (``bench.point`` reports it)
        self.manifest = read_manifest(self.engine_dir, verify=verify)
        if self.manifest.get("backend", "onnxruntime") != "onnxruntime":
            raise ValueError(
                f"{self.engine_dir} was built for {self.manifest['backend']} (its graphs hold PrefixKV plugin nodes "
                "ONNX Runtime cannot run); use --backend auto or build with --backend onnxruntime"
            )
        self.providers = resolve_providers(providers)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        if int(cache_slack) < 1:
            raise ValueError(f"cache_slack must be at least 1 free slot, got {cache_slack}")
        chunk = PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
        if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"prefill_chunk must be a positive number of tokens, got {prefill_chunk!r}")
        self.prefill_chunk = int(chunk)
        self.cache_slack = int(cache_slack)
        options = session_options(ort, threads)
        missing = [g for g in GRAPHS if g not in self.manifest["graphs"]]
        if missing:
            raise EngineError(f"{self.engine_dir}: the manifest lists no {' or '.join(missing)} graph (an engine from an "
                              "older prefixkv); rebuild it with `prefixkv build --force`")
        # the resident memory before the sessions load: what becomes resident is theirs (``pages``)
        before = pages.before_loading() if huge_pages and self.providers[0] == "CPUExecutionProvider" else None
        self.sessions = {}
        for graph in GRAPHS:
            path = self.engine_dir / self.manifest["graphs"][graph]["file"]
            source, graph_options = str(path), options
            if self.providers[0] == "CPUExecutionProvider" and graph == "decoder":
                untied = untie_packed_tables(path)
                if untied is not None:  # the serialized graph; its external data is read from the folder
                    source, graph_options = untied, session_options(ort, threads)
                    graph_options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                           str(path.parent))
            self.sessions[graph] = ort.InferenceSession(source, graph_options, providers=self.providers)
            self._check_io(graph)
        meta = self.sessions["decoder"].get_modelmeta().custom_metadata_map
        if meta.get(CACHE_LAYOUT_KEY) != "buffer":
            raise EngineError(f"{self.engine_dir}: its decoder graph has no buffer cache layout; rebuild it with "
                              "`prefixkv build --force`")
        # an engine whose layers never evict: its decoder takes and returns the one set of slots they all have
        self.shared_slots = meta.get(SLOTS_KEY, "per-layer") == "shared"
        rows = meta.get(SCORE_ROWS_KEY, "all")
        self.score_rows = None if rows == "all" else int(rows)  # trailing prompt rows whose attention mass counts
        # no TensorRT for this graph: it would build an engine for every new buffer shape
        self._compactor = ort.InferenceSession(
            serialized(self.manifest.get("dtype", "float32")), options,
            providers=[p for p in self.providers if p != "TensorrtExecutionProvider"])
        self.layers = int(self.manifest["layers"])
        self.tokenizer = Tokenizer(self.engine_dir)
        self.max_context = int(self.manifest["max_context"])
        self.keep_fraction = float(self.manifest["keep_fraction"])
        self.device = "cuda" if self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self._ort = ort
        self._dtype = np.dtype(self.manifest.get("dtype", "float32"))
        self._outputs = {g: [o.name for o in s.get_outputs()] for g, s in self.sessions.items()}
        inputs = [i.name for i in self.sessions["decoder"].get_inputs()]
        self._scored = "score_from" in inputs  # the decoder sums a chunk's attention mass from row score_from on
        # the layers whose mass the decoder returns (side by side in its ``mass`` output): those the compact graph scores
        self._mass_layers = [int(i.name.split(".")[1]) for i in self.sessions["compact"].get_inputs() if i.name.startswith("mass.")]
        # the decoder outputs a step binds afresh (the rest are the key/value buffers, bound once per buffer)
        self._fresh = ["logits", "present.positions", "present.valid"] + (["mass"] if self._scored else [])
        if before is None:
            pages.release_freed_heap()  # the heap that loading freed, back to the OS
            self.huge_page_bytes = 0
        else:  # that, then the packed weights in huge pages: a decode step streams them all (``docs/engine_v2.md``)
            self.huge_page_bytes = pages.after_loading(before)

    def _check_io(self, graph: str) -> None:
        session = self.sessions[graph]
        expected = self.manifest["graphs"][graph]
        got_in = [i.name for i in session.get_inputs()]
        got_out = [o.name for o in session.get_outputs()]
        if got_in != [i["name"] for i in expected["inputs"]] or got_out != [o["name"] for o in expected["outputs"]]:
            raise EngineError(
                f"{self.engine_dir}: the {graph} graph's inputs/outputs differ from the manifest's; "
                "rebuild the engine with `prefixkv build --force`"
            )

    # -- the two steps ------------------------------------------------------------------------
    def _run(self, graph: str, cpu_inputs: dict, ortvalues=None) -> list:
        session = self.sessions[graph]
        binding = session.io_binding()
        for name, array in cpu_inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in (ortvalues or {}).items():
            binding.bind_ortvalue_input(name, value)
        for name in self._outputs[graph]:
            binding.bind_output(name, self.device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _binding(self, kv: list) -> "DecoderBinding":
        """A decoder binding with the buffers ``kv`` bound as past and present (the fused
        attention writes into them in place)."""
        binding = DecoderBinding(self.sessions["decoder"], self.device, self._fresh, self._ort)
        binding.bind_kv(kv, range(self.layers))
        return binding

    def _step(self, binding: "DecoderBinding", slots: list, inputs: dict):
        """One decoder run on ``binding`` (its buffers bound by ``_binding``) from the slots
        (positions, valid) -> (logits, the new slots, the chunk's mass (B, sum over scored
        layers of their slots) or None), OrtValues.  Only the small inputs and outputs are
        bound here: at batch 1 a decode step's binding is part of its time."""
        binding.set_inputs(inputs)
        io = binding.io
        io.bind_ortvalue_input("past.positions", slots[0])
        io.bind_ortvalue_input("past.valid", slots[1])
        for name in self._fresh:  # new values: the previous step's are still the caller's
            io.bind_output(name, self.device)
        start = time.perf_counter()
        self.sessions["decoder"].run_with_iobinding(io)
        self.run_seconds = time.perf_counter() - start  # ONNX Runtime's own run, without the binding around it
        # get_outputs() would wrap every bound output in a Python object, the 2 x layers buffers
        # too, at every step: wrap only the step's new values, bound first
        outputs = io.get_outputs_as_ortvaluevector()
        fresh = [self._ort.OrtValue(outputs[i]) for i in range(len(self._fresh))]
        return fresh[0], fresh[1:3], (fresh[3] if self._scored else None)

    def prefill(self, input_ids, attention_mask):
        """input_ids, attention_mask (B, S) int64, left padding -> (logits (B, V) float32, state)."""
        return self._prefill(input_ids, attention_mask)

    def _prefill(self, input_ids, attention_mask, image_rows=None):
        """Each row alone (ONNX Runtime's fused attention takes a chunk of several tokens over a
        cache one row at a time), its padding dropped; the rows' compacted caches are then
        merged into one batch (``merge``).  image_rows: a vision engine's image embeddings
        per (row, first token, stop token) of its real tokens."""
        ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.asarray(attention_mask, dtype=np.int64)
        if ids.ndim != 2 or ids.shape != mask.shape or ids.shape[1] < 1:
            raise ValueError(f"input_ids and attention_mask must be (batch, S) arrays of one shape, got {ids.shape} and {mask.shape}")
        lengths = mask.sum(-1).astype(np.int64)
        if (lengths < 1).any():
            raise ValueError("every row of attention_mask needs at least one token (1)")
        logits, states = [], []
        for row in range(ids.shape[0]):
            rows = None if image_rows is None else (lambda start, stop, row=row: image_rows(row, start, stop))
            row_logits, state = _drain(self._begin(ids[row, mask[row].astype(bool)], rows))
            logits.append(row_logits)
            states.append(state)
        state = states[0] if len(states) == 1 else self.merge([(s, [0]) for s in states], free_slots=False)
        return np.concatenate(logits), state

    def _prefill_chunks(self, ids: np.ndarray, image_rows=None):
        """A generator, yielding after each chunk: one prompt (n,) in chunks of ``prefill_chunk`` tokens through the decoder graph (each
        layer's buffers hold the whole prompt; the decoder returns the attention mass of each
        chunk's scored rows, summed here), then every layer compacted to its profile count by
        the compact graph.
        Returns logits (1, V) and per layer the compact cache (key, value OrtValues, positions,
        valid numpy (1, W_l))."""
        ort, n = self._ort, len(ids)
        kv_heads, head_dim = int(self.manifest["kv_heads"]), int(self.manifest["head_dim"])
        # slots [0, T) are written before they are read: no fill needed
        kv = [ort.OrtValue.ortvalue_from_shape_and_type((1, kv_heads, n, head_dim), self._dtype, self.device)
              for _ in range(2 * self.layers)]
        slots = [self._owned(np.zeros((1, 0), np.int64)), self._owned(np.zeros((1, 0), bool))]
        binding = self._binding(kv)
        first_scored = n - (n if self.score_rows is None else min(self.score_rows, n))
        masses = np.zeros((len(self._mass_layers), n), np.float32)  # per scored layer, summed over the chunks
        lengths = np.array([n], np.int64)
        for start in range(0, n, self.prefill_chunk):
            stop = min(start + self.prefill_chunk, n)
            first = int(np.clip(first_scored - start, 0, stop - start))
            inputs = {"input_ids": ids[None, start:stop], "position_ids": np.arange(start, stop, dtype=np.int64)[None],
                      "prompt_lengths": lengths, "past_widths": np.full(self.layers, start, np.int64)}
            if self._scored:
                inputs["score_from"] = np.array(first, np.int64)
            if image_rows is not None:
                inputs["image_embeds"] = image_rows(start, stop)
            logits, slots, mass = self._step(binding, slots, inputs)
            if mass is not None and first < stop - start:  # scored rows; every layer has ``stop`` slots in use
                masses[:, :stop] += mass.numpy().reshape(len(self._mass_layers), stop)
            if stop < n:
                yield
        feeds = {"attention_mask": np.ones((1, n), np.int64)}
        for i, l in enumerate(self._mass_layers):
            feeds[f"mass.{l}"] = masses[i : i + 1]
        values = {f"{part}.{l}": kv[2 * l + j] for l in range(self.layers) for j, part in enumerate(("key", "value"))}
        out = self._run("compact", feeds, ortvalues=values)
        return logits.numpy(), [(*out[4 * l : 4 * l + 2], out[4 * l + 2].numpy(), out[4 * l + 3].numpy()) for l in range(self.layers)]

    # -- in-flight batching -----------------------------------------------------------------
    supports_batching = True

    def begin_prefill(self, ids, pixel_values=None):
        """One prompt's prefill, chunk by chunk: yields after each chunk but the last, returns
        (logits (1, V), state of batch 1)."""
        if pixel_values is not None:
            raise ValueError(f"{self.engine_dir} is a text-only engine; it takes no image")
        return (yield from self._begin(ids))

    def _begin(self, ids, image_rows=None):
        """The prefill generator of one prompt (n,): ``_prefill_chunks``, then its state (batch 1)."""
        ids = np.asarray(list(ids), dtype=np.int64)
        if ids.ndim != 1 or len(ids) < 1:
            raise ValueError("a prompt needs at least one token")
        logits, layers = yield from self._prefill_chunks(ids, image_rows)
        n = np.array([len(ids)], np.int64)
        return logits, self._state(layers, n.copy(), n)

    def _state(self, layers: list, positions, prompt_lengths) -> OnnxRuntimeState:
        """A state from per layer (key, value OrtValues, positions, valid numpy (B, W_l))."""
        return OnnxRuntimeState(*self._side_by_side(layers), positions, prompt_lengths, shared=self.shared_slots)

    def _side_by_side(self, layers: list) -> tuple:
        """Per layer (key, value OrtValues, positions, valid numpy (B, W_l)) -> the state's
        kv, slots (one (positions, valid) pair of OrtValues, the layers side by side, or the
        first layer's where the layers share their slots) and widths."""
        kv = [t for layer in layers for t in layer[:2]]
        widths = np.array([layer[2].shape[1] for layer in layers], np.int64)
        if self.shared_slots:
            first = layers[0]
            if any(not (np.array_equal(layer[2], first[2]) and np.array_equal(layer[3], first[3])) for layer in layers[1:]):
                raise EngineError(f"{self.engine_dir}: its layers share their slots, but these layers' slots differ")
            return kv, [self._owned(first[2]), self._owned(first[3])], widths
        slots = [self._owned(np.concatenate([layer[2 + i] for layer in layers], axis=1)) for i in (0, 1)]
        return kv, slots, widths

    def merge(self, parts, free_slots: bool = True):
        """parts: [(state, rows)] -> one state holding those rows in that order: each layer's
        entries (empty slots dropped) right-aligned at the widest row's count (where the layers
        share their slots: each row's entries first, its empty slots after them), then free slots
        as a compaction adds them (``free_slots`` False: none, as a prefill leaves its caches).
        Rows join and leave a running batch this way, and a batch's prefilled rows become one
        batch; it copies the rows' caches once.  The states given are consumed."""
        parts = [(state, np.asarray(rows, dtype=np.int64).reshape(-1)) for state, rows in parts]
        for state, _ in parts:
            self._check_state(state, len(state.positions))  # a consumed state included (``check_live``)
        given = [state for state, _ in parts]
        parts = [(state, rows) for state, rows in parts if len(rows)]
        if not parts:
            raise ValueError("merge needs at least one row")
        layered = [state.layers() for state, _ in parts]
        compacted = [self._compacted(state_layers, rows) for (_, rows), state_layers in zip(parts, layered)]
        layers = []
        for l in range(self.layers):
            pieces = []
            for (_, rows), state_layers, plans in zip(parts, layered, compacted):
                key, value = state_layers[l][:2]
                index, pos, val = plans[l]
                take = index[:, None, :, None]
                pieces.append((np.take_along_axis(key.numpy()[rows], take, axis=2),
                               np.take_along_axis(value.numpy()[rows], take, axis=2), pos, val))
            width = max(p[2].shape[1] for p in pieces)
            free = self._free_slots(width) if free_slots else 0
            b = sum(p[2].shape[0] for p in pieces)
            _, heads, _, dim = pieces[0][0].shape
            key, value = (np.zeros((b, heads, width + free, dim), self._dtype) for _ in range(2))
            positions, valid = np.full((b, width), -1, np.int64), np.zeros((b, width), bool)
            row = 0
            for k, v, p, m in pieces:
                r, w = p.shape
                at = slice(0, w) if self.shared_slots else slice(width - w, width)  # as ``_compacted`` aligns them
                key[row : row + r, :, at], value[row : row + r, :, at] = k, v
                positions[row : row + r, at], valid[row : row + r, at] = p, m
                row += r
            layers.append((self._owned(key), self._owned(value), positions, valid))
        merged = self._state(layers, np.concatenate([s.positions[r] for s, r in parts]),
                             np.concatenate([s.prompt_lengths[r] for s, r in parts]))
        for state in given:  # every state given, one that gave no row included
            state.kv = state.binding = None
        return merged

    def cache_layout(self):
        from .batching import CacheLayout

        return CacheLayout.from_manifest(self.manifest, self.cache_slack)

    def decode(self, state: OnnxRuntimeState, token_ids):
        """token_ids (B,) int64 -> (logits (B, V) float32, new state).  The state given is
        consumed: the step writes into its key/value buffers, which the new state holds."""
        tokens = np.asarray(token_ids, dtype=np.int64).reshape(-1, 1)
        kv, slots, widths, binding = state.kv, state.slots, state.widths, state.binding
        trusted = state.unchecked_steps
        if (trusted is not None and trusted[0] is self and trusted[1] > 0 and kv is trusted[2] and binding is not None
                and len(tokens) == len(state.positions)):
            # the state of this runner's own step, with free slots and positions left: the
            # checks below would pass; at batch 1 they were a third of the step's Python (a
            # consumed state has no kv, so it takes the checks and their one line)
            capacity, left = state.capacity, trusted[1] - 1
        else:
            capacity, left = self._checked(state, len(tokens)), None
            # no free slot: compact, add slack (layers that share their slots have the same capacities: all or none)
            full = np.flatnonzero(capacity <= widths).tolist()
            if full:
                kv, slots, widths = self._compact(state, full)
                capacity = None  # new buffers: the next check reads them
                if binding is not None:
                    binding.bind_kv(kv, full)
            if binding is None or binding.session is not self.sessions["decoder"]:  # another runner's state: bind here
                binding = self._binding(kv)
        inputs = {"input_ids": tokens, "position_ids": state.positions.reshape(-1, 1), "prompt_lengths": state.prompt_lengths,
                  "past_widths": widths}
        if self._scored:
            inputs["score_from"] = np.array(1, np.int64)  # no scored row: a decode step's mass is not used
        inputs.update(self._decode_extras(len(tokens)))
        try:
            logits, slots, _ = self._step(binding, slots, inputs)
        except Exception:
            state.binding = state.unchecked_steps = None  # it may hold buffers a compaction made; the next step binds afresh
            raise
        state.kv = state.binding = None
        new = OnnxRuntimeState(kv, slots, widths + 1, state.positions + 1, state.prompt_lengths, binding, state.shared)
        new.capacity = capacity
        if capacity is not None:
            if left is None:
                left = min(int((capacity - new.widths).min()), self.max_context - int(new.positions.max()))
            new.unchecked_steps = (self, left, kv)
        return logits.numpy(), new

    def _checked(self, state: OnnxRuntimeState, batch: int) -> np.ndarray:
        """``_check_state``, and one line if a row already holds the whole context."""
        capacity = self._check_state(state, batch)
        if state.positions.max() >= self.max_context:  # the graph's rotary tables end there
            row = int(np.argmax(state.positions >= self.max_context))
            raise ValueError(f"row {row} holds the engine's whole context of {self.max_context} tokens; "
                             "no position is left for another token")
        return capacity

    def _check_state(self, state: OnnxRuntimeState, batch: int) -> np.ndarray:
        """Each layer's buffer capacity in slots (L,), or one line if the state's parts disagree (the
        graph would split its slots by widths that are not theirs, silently, or fail with ONNX
        Runtime's message)."""
        state.check_live()
        widths = np.asarray(state.widths)
        rows = len(state.positions)
        if widths.shape != (self.layers,) or len(state.kv) != 2 * self.layers:
            raise ValueError(f"this state is not this engine's: {len(state.kv) // 2} layers' buffers and widths of shape "
                             f"{widths.shape}, the engine has {self.layers} layers")
        if batch != rows:
            raise ValueError(f"decode got {batch} tokens for a state of {rows} rows")
        if state.shared != self.shared_slots:
            raise ValueError("this state is not this engine's: " + ("its layers share their slots, the engine's do not"
                             if state.shared else "its layers' slots are side by side, the engine's layers share theirs")
                             + " (OnnxRuntimeState.shared)")
        if state.shared and (widths != widths[0]).any():
            raise ValueError(f"this state's layers share their slots but hold {sorted(set(widths.tolist()))} slots")
        shapes, count = [tuple(v.shape()) for v in state.slots], state.slot_count()
        if any(shape != (rows, count) for shape in shapes):
            raise ValueError(f"this state's slots are {shapes[0]}, its widths say ({rows}, {count})")
        if state.capacity is None:
            state.capacity = np.array([state.kv[2 * l].shape()[2] for l in range(self.layers)], np.int64)
        capacity = state.capacity
        short = np.flatnonzero(capacity < widths)
        if short.size:
            l = int(short[0])
            raise ValueError(f"this state's layer {l} holds {capacity[l]} slots, its width says {int(widths[l])}")
        return capacity

    def _decode_extras(self, batch: int) -> dict:
        """Inputs a subclass's decoder graph takes besides the text ones (a vision engine: no image rows)."""
        return {}

    def _compact(self, state: OnnxRuntimeState, full: list[int]):
        """The state's kv, slots and widths with the layers ``full`` compacted (``_compact_layer``)."""
        layers = state.layers()
        for l, plan in zip(full, self._compacted([layers[l] for l in full])):
            layers[l] = self._compact_layer(*layers[l][:2], *plan)
        return self._side_by_side(layers)

    def _compacted(self, layers: list, rows=slice(None), left: bool | None = None) -> list[tuple]:
        """``compact_slots`` of each layer's slots (``layers``: ``state.layers()`` items), of
        the rows ``rows``: computed once for all of them where the layers share their slots.
        ``left`` (default: where the layers share their slots, whose rows hold their entries
        first for the decoder's per-row lengths, ``row_lengths`` in the exporter): each row's
        entries first, else right-aligned."""
        count = 1 if self.shared_slots else len(layers)
        left = self.shared_slots if left is None else left
        plans = [compact_slots(positions[rows], valid[rows], left=left) for _, _, positions, valid in layers[:count]]
        return plans * len(layers) if self.shared_slots else plans

    def _free_slots(self, width: int) -> int:
        """The free slots of a buffer (re)allocated for ``width`` slots in use: ``cache_slack``
        or an eighth of them, whichever is more, within ``max_context`` slots in all (the
        decoder's rotary tables have that many rows, and ONNX Runtime's fused attention refuses
        to attend over more slots than the tables' rows)."""
        return max(0, min(max(self.cache_slack, width // 8), self.max_context - width))

    def _compact_layer(self, key, value, index, positions, valid) -> tuple:
        """One layer's cache with its empty slots dropped (entries right-aligned in original
        order, like the prefill's) in new buffers with ``_free_slots`` free slots (a growing
        cache is copied O(1) times per step on average, short of the context's end).
        key/value OrtValues, and ``compact_slots`` of the layer's slots -> key/value
        OrtValues, positions/valid numpy (B, W)."""
        b, h, capacity, d = key.shape()
        width = index.shape[1]
        free = self._free_slots(width)
        # one flat row index per (row, head, new slot) into key viewed as (B*H*C, D); free slots copy row 0
        slots = np.concatenate([index, np.zeros((b, free), np.int64)], axis=1)  # (B, W' + free)
        base = (np.arange(b)[:, None] * h + np.arange(h)[None, :]) * capacity  # (B, H)
        binding = self._compactor.io_binding()
        binding.bind_ortvalue_input("key", key)
        binding.bind_ortvalue_input("value", value)
        binding.bind_cpu_input("rows", (base[:, :, None] + slots[:, None, :]).reshape(-1))
        binding.bind_cpu_input("shape", np.array([b, h, width + free, d], dtype=np.int64))
        binding.bind_cpu_input("flat", np.array([-1, d], dtype=np.int64))
        binding.bind_output("key_out", self.device)
        binding.bind_output("value_out", self.device)
        self._compactor.run_with_iobinding(binding)
        return (*binding.get_outputs(), positions, valid)

    def _owned(self, array: np.ndarray):
        """``array`` copied into an OrtValue that owns its memory.  ``ortvalue_from_numpy``
        borrows the array's buffer, and ``numpy()`` views of such a value dangle once the
        Python wrapper is gone (ORT 1.32: the view's capsule holds the C++ value, not the
        array), so a state's cache is never built that way."""
        value = self._ort.OrtValue.ortvalue_from_shape_and_type(array.shape, array.dtype, self.device)
        value.update_inplace(np.ascontiguousarray(array))
        return value

    # -- inspection ---------------------------------------------------------------------------
    def kept_positions(self, state: OnnxRuntimeState) -> list[np.ndarray]:
        """Per layer, (B, W_l) int64 original positions of the kept entries (-1: empty slot),
        right-aligned in original order (the layout of the reference cache)."""
        self._check_state(state, len(state.positions))
        return [positions for _, positions, _ in self._compacted(state.layers(), left=False)]

    def cache(self, state: OnnxRuntimeState, layer: int, kv: bool = True) -> dict[str, np.ndarray]:
        """One layer's entries as numpy, empty slots dropped: key, value (B, Hkv, W, D) (unless
        ``kv`` is False), positions, valid (B, W); W = the most entries any row holds."""
        key, value, positions, slots = state.layers()[layer]
        buffers = (key.numpy(), value.numpy()) if kv else ()
        positions, valid, *buffers = compact_entries(positions, slots, *buffers)
        return {"positions": positions, "valid": valid, **dict(zip(("key", "value"), buffers))}

    def layer_lengths(self, state: OnnxRuntimeState) -> np.ndarray:
        """(layers, B) entries held per layer and row."""
        return np.stack([valid.sum(-1) for _, _, _, valid in state.layers()])

    def kv_bytes(self, state: OnnxRuntimeState) -> int:
        """Bytes of key and value storage allocated (every slot of every layer's buffers,
        the free ones included)."""
        return sum(int(np.prod(buffer.shape())) for buffer in state.kv) * self._dtype.itemsize


# -- images ----------------------------------------------------------------------------------------
class VisionOnnxRuntimeRunner(ImageInputs, OnnxRuntimeRunner):
    """A vision engine folder (``pipeline.build_engine`` of a LLaVA model): the vision graph, and
    a decoder graph that also takes image embeddings for the image tokens of each chunk."""

    name = "onnxruntime-vision"

    def __init__(self, engine_dir: str | Path, providers=None, threads: int | None = None, verify: bool = True, **kwargs):
        manifest = read_manifest(engine_dir, verify=False)
        if not manifest.get("vision"):  # before loading any graph
            source = manifest["model"]["source"]
            raise ImageError(
                f"{engine_dir} is a text-only engine (built from {source}); it takes no image: drop the image, "
                "or build a vision engine from a LLaVA model with `prefixkv build`")
        super().__init__(engine_dir, providers=providers, threads=threads, verify=verify, **kwargs)
        self.vision = self.manifest["vision"]
        if "vision" not in self.manifest["graphs"]:
            raise EngineError(f"{self.engine_dir}: the manifest lists no vision graph; rebuild it with `prefixkv build --force`")
        self.image_processor = ImageProcessor.from_dict(self.vision["processor"], f"{self.engine_dir}/manifest.json")
        options = self.sessions["decoder"].get_session_options()
        path = self.engine_dir / self.manifest["graphs"]["vision"]["file"]
        self.sessions["vision"] = self._ort.InferenceSession(str(path), options, providers=self.providers)
        self._check_io("vision")
        self._outputs["vision"] = [o.name for o in self.sessions["vision"].get_outputs()]

    def image_embeddings(self, pixel_values) -> np.ndarray:
        """(I, 3, H, W) float32 -> (I, N, hidden): the vision graph (no run for I = 0)."""
        pixels = np.asarray(pixel_values, dtype=np.float32)
        if pixels.shape[0] == 0:
            return np.zeros((0, self.vision["tokens_per_image"], self.vision["hidden"]), self._dtype)
        return self.sessions["vision"].run(None, {"pixel_values": np.ascontiguousarray(pixels)})[0]

    def prefill(self, input_ids, attention_mask, pixel_values=None):
        """input_ids, attention_mask (B, S) int64; pixel_values (I, 3, H, W) -> (logits (B, V), state)."""
        pixels = self._pixels_for(input_ids, pixel_values)
        return self.prefill_embeds(input_ids, attention_mask, self.image_embeddings(pixels))

    def prefill_embeds(self, input_ids, attention_mask, image_embeds):
        """The prefill on given image embeddings (I, N, hidden), in row-major order of the
        image tokens (graph-level validation feeds the reference's)."""
        return self._prefill(input_ids, attention_mask, self._image_rows(input_ids, attention_mask, image_embeds))

    def begin_prefill(self, ids, pixel_values=None):
        """One prompt's prefill, chunk by chunk (see ``OnnxRuntimeRunner.begin_prefill``), its
        images' embeddings computed first."""
        input_ids = np.asarray(list(ids), dtype=np.int64)[None]
        mask = np.ones_like(input_ids)
        rows = self._image_rows(input_ids, mask, self.image_embeddings(self._pixels_for(input_ids, pixel_values)))
        return (yield from self._begin(input_ids[0], lambda start, stop: rows(0, start, stop)))

    def _image_rows(self, input_ids, attention_mask, image_embeds):
        """-> rows(row, start, stop): the image embedding rows of that row's real tokens [start, stop)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        rows = np.asarray(image_embeds, dtype=self._dtype).reshape(-1, int(self.vision["hidden"]))
        is_image = ids == int(self.vision["image_token_id"])
        if int(is_image.sum()) != rows.shape[0]:
            raise ValueError(f"the prompts hold {int(is_image.sum())} image tokens but {rows.shape[0]} image "
                             "embedding rows were given")
        order = (np.cumsum(is_image.reshape(-1)) - 1).reshape(ids.shape)  # each image token's row
        real = np.asarray(attention_mask).astype(bool)

        def chunk_rows(row: int, start: int, stop: int) -> np.ndarray:
            """The image rows of tokens [start, stop) of the row's real tokens."""
            tokens, images = order[row, real[row]][start:stop], is_image[row, real[row]][start:stop]
            return rows[tokens[images]]

        return chunk_rows

    def _decode_extras(self, batch: int) -> dict:
        return {"image_embeds": np.zeros((0, int(self.vision["hidden"])), self._dtype)}


def _drain(generator):
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(generator)
        except StopIteration as done:
            return done.value


def compact_entries(positions: np.ndarray, valid: np.ndarray, *buffers: np.ndarray) -> tuple:
    """positions/valid (B, W) and numpy buffers (B, H, C >= W, D) -> positions, valid and the
    buffers with the empty slots dropped, each row's entries right-aligned in original order
    (``compact_slots``): the reference cache's layout.  Buffers already compact (after a
    prefill) are sliced, not gathered."""
    index, compact_positions, compact_valid = compact_slots(positions, valid)
    same = np.array_equal(compact_valid, valid)  # already compact: the slots as they are
    width, take = compact_valid.shape[1], index[:, None, :, None]
    return (compact_positions, compact_valid,
            *(buffer[:, :, :width] if same else np.take_along_axis(buffer, take, axis=2) for buffer in buffers))


def compact_slots(positions: np.ndarray, valid: np.ndarray, left: bool = False):
    """Where a layer's entries go when its empty slots are dropped.

    positions/valid (B, W) with empty slots anywhere -> index (B, W') int64 into W (the slot
    each new slot copies; 0 for empty ones), positions and valid (B, W'): each row's entries
    right-aligned in original order, empty slots in front, W' = the most entries a row holds
    (``left``: the entries first, the empty slots after them)."""
    valid = np.asarray(valid, dtype=bool)
    width = max(int(valid.sum(-1).max()) if valid.size else 0, 1)
    cols = np.arange(valid.shape[1])
    if left:  # entries first in slot order, then the empty slots; keep the first ``width``
        order = np.argsort(np.where(valid, cols, cols + valid.shape[1]), axis=-1, kind="stable")[:, :width]
    else:  # empty slots sort first, entries after them in slot order; keep the last ``width``
        order = np.argsort(np.where(valid, cols + valid.shape[1], cols), axis=-1, kind="stable")[:, -width:]
    kept = np.take_along_axis(valid, order, -1)
    index = np.where(kept, order, 0).astype(np.int64)
    positions = np.where(kept, np.take_along_axis(np.asarray(positions), order, -1), -1).astype(np.int64)
    return index, positions, kept
