"""What prefixkv implements of a decoder's structure, and the one check that refuses the rest.

A model is read once into a ``Structure`` (its attention and block layout, from the config and
the modules) and compared with what each path implements:

    the PyTorch path   the model's own forward with the prefixkv attention (calibrate, eval,
                       the validation reference): any block layout, one causal attention per
                       layer, optionally within one sliding window over every layer (Mistral,
                       Phi-3), which prefixkv keeps every sequence inside
    the exporter       the graphs re-run the blocks: pre-norm (Llama, Mistral, Qwen2/3, Gemma,
                       Granite with its multipliers, Phi-3 with its fused projections split) and
                       post-norm (OLMo2, its q/k norms over all heads)

Anything else (logit soft-capping, windows on some layers only, sandwich norms, a layout it
does not know) is refused with the reason, before any work starts.  Pure inspection: no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass


class UnsupportedModel(ValueError):
    """A model whose structure prefixkv does not implement, with the reason."""


@dataclass(frozen=True)
class Structure:
    name: str                       # the model class
    window: int | None = None       # one sliding window over every layer (tokens), None: none
    partial_window: bool = False    # windows on some layers only (Gemma 2/3, Qwen2 max_window_layers)
    softcap: float | None = None    # attention logit soft-capping
    embedding_multiplier: float = 1.0   # Granite: embeddings x m
    residual_multiplier: float = 1.0    # Granite: each block's output x m before the residual add
    logits_scaling: float = 1.0         # Granite: logits / s
    fused_qkv: bool = False         # one qkv_proj (Phi-3)
    norms: str = "pre"              # "pre" (Llama), "post" (OLMo2), "sandwich" (Gemma 2/3), "unknown"
    qk_norm: str = "none"           # "none", "head" (Qwen3: per head), "full" (OLMo2: over all heads)
    decoder: bool = True            # model.model.{embed_tokens, layers, norm, rotary_emb} and lm_head

    def torch_problems(self) -> list[str]:
        """What the PyTorch path (the model's forward with the prefixkv attention) lacks."""
        out = []
        if self.softcap:
            out.append(f"attention logit soft-capping ({self.softcap:g})")
        if self.partial_window:
            out.append("sliding windows on some layers only")
        return out

    def export_problems(self) -> list[str]:
        """What the ONNX and plugin exporters lack, beyond ``torch_problems``."""
        out = self.torch_problems()
        if not self.decoder:
            out.append("a block layout other than a Llama-family decoder (model.model.embed_tokens / layers / norm / "
                       "rotary_emb and lm_head)")
        if self.norms == "sandwich":
            out.append("sandwich norms around the attention and MLP (Gemma 2/3 layout)")
        elif self.norms == "unknown":
            out.append("a layer without input_layernorm or post-norm pair")
        return out


def text_config(config):
    """A model config's language-model part (a vision model's text config; else the config itself)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _language_model(model):
    """The decoder stack of a causal LM or of a vision-language model's language model."""
    base = getattr(model, "model", None)
    return getattr(base, "language_model", None) or base


def structure(model) -> Structure:
    """Read ``model``'s structure from its config and modules."""
    text = text_config(model.config)
    layers = getattr(text, "num_hidden_layers", 0) or 0
    types = list(getattr(text, "layer_types", None) or [])
    window = getattr(text, "sliding_window", None)
    windowed = [t == "sliding_attention" for t in types]
    if types:
        uniform = window if window and windowed and all(windowed) else None
        partial = any(windowed) and not all(windowed)
    elif getattr(text, "use_sliding_window", None) is True:  # Qwen2-style: layers >= max_window_layers
        first = getattr(text, "max_window_layers", 0) or 0
        uniform, partial = (window, False) if first == 0 else (None, first < layers)
    elif getattr(text, "use_sliding_window", None) is False:
        uniform, partial = None, False
    else:  # Mistral, Phi-3: the window, when set, covers every layer
        uniform, partial = (window if window else None), False
    base = _language_model(model)
    decoder = bool(base is not None and all(hasattr(base, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb"))
                   and hasattr(model, "lm_head"))
    norms, qk, fused = "pre", "none", False
    blocks = getattr(base, "layers", None) if base is not None else None
    if blocks:
        layer = blocks[0]
        attn = getattr(layer, "self_attn", None)
        if hasattr(layer, "pre_feedforward_layernorm") or hasattr(layer, "post_feedforward_layernorm") and hasattr(layer, "input_layernorm"):
            norms = "sandwich"
        elif hasattr(layer, "post_feedforward_layernorm") and hasattr(layer, "post_attention_layernorm"):
            norms = "post"
        elif not (hasattr(layer, "input_layernorm") and hasattr(layer, "post_attention_layernorm")):
            norms = "unknown"
        if attn is not None:
            fused = hasattr(attn, "qkv_proj") and not hasattr(attn, "q_proj")
            q_norm = getattr(attn, "q_norm", None)
            if q_norm is not None and getattr(q_norm, "weight", None) is not None:
                head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
                qk = "head" if q_norm.weight.numel() == head_dim else "full"
            if not (fused or all(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))) or not hasattr(attn, "o_proj"):
                decoder = False
        else:
            decoder = False
    return Structure(
        name=type(model).__name__, window=int(uniform) if uniform else None, partial_window=bool(partial),
        softcap=getattr(text, "attn_logit_softcapping", None) or None,
        embedding_multiplier=float(getattr(text, "embedding_multiplier", 1.0) or 1.0),
        residual_multiplier=float(getattr(text, "residual_multiplier", 1.0) or 1.0),
        logits_scaling=float(getattr(text, "logits_scaling", 1.0) or 1.0),
        fused_qkv=fused, norms=norms, qk_norm=qk, decoder=decoder,
    )


SUPPORTED = "Llama, Mistral, Qwen2/3, Gemma (1), Granite, Phi-3, OLMo2 and SmolLM"


def check(model, export: bool = False) -> Structure:
    """``model``'s structure, or ``UnsupportedModel`` naming what is missing: for the PyTorch
    path, and with ``export`` for the exporters too."""
    s = structure(model)
    problems = s.export_problems() if export else s.torch_problems()
    if problems:
        what = "the prefixkv exporter" if export else "the prefixkv attention"
        raise UnsupportedModel(f"{s.name}: {what} does not implement {' and '.join(problems)}; "
                               f"prefixkv supports {SUPPORTED} layouts without them")
    return s
