"""Export a LLaVA-style model: the vision tower, and the text engine's graphs taking image embeddings.

    vision(pixel_values) -> image_embeds
        pixel_values: (I, 3, H, W) float32, the processor's output for I images
        image_embeds: (I, N, hidden), N image tokens per image (the vision tower's selected
        layer, CLS dropped for the "default" strategy, through the projector)

    decoder: the text engine's decoder graph (``prefixkv.exporter.onnx.DecoderGraph``) with
        one more input, image_embeds (rows, hidden): the image rows of the chunk's image
        tokens in row-major order (0 rows in a decode step).  Each image appears as N
        image-token ids (``<image>`` expanded by the processor); the rows replace those
        tokens' embeddings (``merge_image_embeds``), then the language model runs as for text.

    compact: the text engine's graph, unchanged.

``prefixkv.pipeline.build_engine`` calls ``export_vision_engine_graphs`` for a vision model.
The language model is reached through ``TextView`` (``model.model.language_model`` and
``model.lm_head`` under the names the text exporter expects), so the text exporter's
``Decoder``, ``graph_spec`` and graphs are reused as they are.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import onnx
import torch
from torch import nn

from ..exporter.onnx import OPSET, ExportError, engine_graphs, export_engine_graph
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


def export_vision_engine_graphs(model, spec, geometry: dict, folder: str | Path, opset: int = OPSET, log=None) -> dict[str, Path]:
    """vision.onnx, and the text engine's decoder.onnx (taking image embeddings) and compact.onnx, into ``folder``."""
    folder, text = Path(folder), TextView(model)
    return {
        "vision": export_vision_graph(model, geometry, folder / "vision.onnx", opset, log),
        "decoder": export_engine_graph(text, spec, "decoder", folder / "decoder.onnx", opset, log,
                                       image_token_id=geometry["image_token_id"], hidden=geometry["hidden"]),
        **{g: export_engine_graph(text, spec, g, folder / f"{g}.onnx", opset, log) for g in engine_graphs(spec)[1:]},
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
