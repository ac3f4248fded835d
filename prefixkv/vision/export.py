"""Export a LLaVA-style model to three ONNX graphs: the vision tower and the image-taking prefill.

    vision(pixel_values) -> image_embeds
        pixel_values: (I, 3, H, W) float32, the processor's output for I images
        image_embeds: (I, N, hidden), N image tokens per image (the vision tower's selected
        layer, CLS dropped for the "default" strategy, through the projector)

    prefill(input_ids, attention_mask, image_embeds) -> logits, per layer key, value, positions, valid
        input_ids, attention_mask: (B, S) int64, left padding; each image appears as N
        image-token ids (``<image>`` expanded by the processor); image_embeds (I, N, hidden)
        for the images in row-major order of their tokens (I may be 0).  The image rows
        replace the token embeddings at the image-token positions, then the language model
        runs with the profile's per-layer keep fractions baked in, exactly as the text
        prefill graph (``prefixkv.exporter.onnx.PrefillGraph``).

    decode: the text engine's decode graph, unchanged.

``prefixkv.pipeline.build_engine`` calls ``export_vision_engine_graphs`` for a vision model.
The language model is reached through ``TextView`` (``model.model.language_model`` and
``model.lm_head`` under the names the text exporter expects), so the text exporter's
``Decoder``, ``graph_spec``, compaction and decode export are reused as they are.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import onnx
import torch
from torch import nn

from ..exporter.onnx import (
    OPSET,
    ExportError,
    PrefillGraph,
    _dynamic_shapes,
    _name_dims,
    export_graph,
    io_names,
)
from .preprocess import ImageProcessor

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.json")


def _llava_parts(model):
    """(vision_tower, projector, language_model) of a LLaVA-style model, or ExportError."""
    base = getattr(model, "model", None)
    parts = [getattr(base, n, None) for n in ("vision_tower", "multi_modal_projector", "language_model")]
    if any(p is None for p in parts) or not hasattr(model, "lm_head"):
        raise ExportError(
            f"{type(model).__name__} is not a LLaVA-style model (model.model.vision_tower / multi_modal_projector / "
            "language_model and model.lm_head); the vision exporter supports LlavaForConditionalGeneration")
    return parts


class TextView(nn.Module):
    """The language model of a LLaVA model, shaped like a causal LM for the text exporter."""

    def __init__(self, model):
        super().__init__()
        _, _, language_model = _llava_parts(model)
        self.model = language_model
        self.lm_head = model.lm_head
        self.config = model.config  # get_text_config() gives the language model's


class VisionGraph(nn.Module):
    """pixel_values (I, 3, H, W) -> image_embeds (I, N, hidden): ``get_image_features`` in one tensor."""

    def __init__(self, model):
        super().__init__()
        self.vision_tower, self.projector, _ = _llava_parts(model)
        self.layer = model.config.vision_feature_layer
        self.strategy = model.config.vision_feature_select_strategy
        if self.strategy not in ("default", "full"):
            raise ExportError(f"vision_feature_select_strategy {self.strategy!r} is not supported (default or full)")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
        chosen = [states[i][:, 1:] if self.strategy == "default" else states[i] for i in layers]
        return self.projector(torch.cat(chosen, dim=-1))


def merge_image_embeds(embeds: torch.Tensor, input_ids: torch.Tensor, image_embeds: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Token embeddings (B, S, hidden) with the image-token rows replaced, in row-major order.

    image_embeds (I, N, hidden); I x N must equal the number of image tokens (the runners
    check it).  Gather-based (no masked_scatter), so it exports to plain ONNX and takes I = 0.
    """
    b, s, h = embeds.shape
    is_image = (input_ids == image_token_id).reshape(-1)
    table = torch.cat([torch.zeros(1, h, dtype=embeds.dtype, device=embeds.device), image_embeds.reshape(-1, h).to(embeds.dtype)])
    index = torch.cumsum(is_image.to(torch.int64), dim=0) * is_image.to(torch.int64)  # 0: not an image token
    merged = torch.index_select(table, 0, index).reshape(b, s, h)
    return torch.where(is_image.reshape(b, s, 1), merged, embeds)


class ImagePrefillGraph(PrefillGraph):
    """(input_ids, attention_mask, image_embeds) -> the text prefill graph's outputs."""

    def __init__(self, model, spec, image_token_id: int):
        super().__init__(TextView(model), spec)
        self.image_token_id = int(image_token_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor):
        dec = self.decoder
        hidden = merge_image_embeds(dec.embed_tokens(input_ids), input_ids, image_embeds, self.image_token_id)
        return self.from_embeddings(hidden, attention_mask)  # the text prefill graph from here on


# -- settings -------------------------------------------------------------------------------------
def image_geometry(model, processor) -> dict:
    """The manifest's ``vision`` entry: image token, tokens per image, pixel size, processor settings."""
    image_processor = processor if isinstance(processor, ImageProcessor) else ImageProcessor.from_dict(
        processor.image_processor.to_dict(), "the model's image processor")
    height, width = image_processor.output_size
    vision = VisionGraph(model).eval()
    dtype = next(model.parameters()).dtype
    with torch.no_grad():
        embeds = vision(torch.zeros(1, 3, height, width, dtype=dtype))
    token = getattr(processor, "image_token", None) or "<image>"
    return {
        "image_token": token,
        "image_token_id": int(model.config.image_token_id),
        "tokens_per_image": int(embeds.shape[1]),
        "hidden": int(embeds.shape[2]),
        "pixel_shape": [3, height, width],
        "processor": image_processor.to_dict(),
    }


# -- export ---------------------------------------------------------------------------------------
def _save(program, path: Path, log, name: str, start: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(program.model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    if log:
        log(f"exported {name} graph in {time.perf_counter() - start:.0f} s -> {path}")
    return path


def export_vision_graph(model, geometry: dict, path: str | Path, opset: int = OPSET, log=None) -> Path:
    """vision.onnx: pixel_values (I, 3, H, W) -> image_embeds (I, N, hidden), I dynamic."""
    start = time.perf_counter()
    dtype = next(model.parameters()).dtype
    pixels = torch.randn(2, *geometry["pixel_shape"], generator=torch.Generator().manual_seed(0)).to(dtype)
    images = torch.export.Dim("images", min=1, max=1024)
    with torch.no_grad():
        program = torch.onnx.export(VisionGraph(model).eval(), (pixels,), dynamo=True, input_names=["pixel_values"],
                                    output_names=["image_embeds"], dynamic_shapes={"pixel_values": {0: images}},
                                    opset_version=opset, optimize=True, verbose=False)
    for value in list(program.model_proto.graph.input) + list(program.model_proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "images"
    return _save(program, Path(path), log, "vision", start)


def prefill_sample_inputs(spec, geometry: dict, batch: int = 2, extra: int = 8):
    """Tracing inputs: ``batch`` left-padded rows, one image each (no size is 0 or 1)."""
    g = torch.Generator().manual_seed(0)
    n, token = geometry["tokens_per_image"], geometry["image_token_id"]
    length = n + extra
    ids = torch.randint(0, spec.vocab, (batch, length), generator=g)
    ids = torch.where(ids == token, (ids + 1) % spec.vocab, ids)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[0, :3] = 0
    for row in range(batch):
        start = 4 if row == 0 else 2
        ids[row, start : start + n] = token
    embeds = torch.randn(batch, n, geometry["hidden"], generator=g).to(getattr(torch, spec.dtype))
    return ids, mask, embeds


def export_image_prefill_graph(model, spec, geometry: dict, path: str | Path, opset: int = OPSET, log=None) -> Path:
    """prefill.onnx taking (input_ids, attention_mask, image_embeds); same outputs as the text graph."""
    start = time.perf_counter()
    wrapper = ImagePrefillGraph(model, spec, geometry["image_token_id"]).eval()
    shapes = dict(_dynamic_shapes(spec, "prefill"))
    shapes["image_embeds"] = {0: torch.export.Dim("images", min=1, max=1024)}
    names = io_names(spec.layers)["prefill"]
    with torch.no_grad():
        program = torch.onnx.export(wrapper, prefill_sample_inputs(spec, geometry), dynamo=True,
                                    input_names=[*names["inputs"], "image_embeds"], output_names=names["outputs"],
                                    dynamic_shapes=shapes, opset_version=opset, optimize=True, verbose=False)
    _name_dims(program.model_proto, "prefill", spec.layers)
    program.model_proto.graph.input[2].type.tensor_type.shape.dim[0].dim_param = "images"
    return _save(program, Path(path), log, "prefill (image)", start)


def export_vision_engine_graphs(model, spec, geometry: dict, folder: str | Path, opset: int = OPSET, log=None) -> dict[str, Path]:
    """vision.onnx, prefill.onnx (with image_embeds) and the text decode.onnx into ``folder``."""
    folder = Path(folder)
    return {
        "vision": export_vision_graph(model, geometry, folder / "vision.onnx", opset, log),
        "prefill": export_image_prefill_graph(model, spec, geometry, folder / "prefill.onnx", opset, log),
        "decode": export_graph(TextView(model), spec, "decode", folder / "decode.onnx", opset, log),
    }


def copy_processor(model_folder: str | Path, folder: str | Path) -> list[str]:
    """Copy the processor settings; a chat template kept in chat_template.json becomes chat_template.jinja."""
    model_folder, folder = Path(model_folder), Path(folder)
    copied = []
    for name in PROCESSOR_FILES:
        if (model_folder / name).is_file():
            shutil.copyfile(model_folder / name, folder / name)
            copied.append(name)
    if not (folder / "chat_template.jinja").is_file() and (model_folder / "chat_template.json").is_file():
        template = json.loads((model_folder / "chat_template.json").read_text()).get("chat_template")
        if isinstance(template, str):
            (folder / "chat_template.jinja").write_text(template)
            copied.append("chat_template.jinja")
    return copied
