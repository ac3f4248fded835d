"""Exporter: the graphs of an engine, with the per-layer lengths baked in.  No calibration, no validation.

    onnx.py           the graph wrappers (ONNX Runtime: decoder + compact; TensorRT plugin base:
                      prefill + decode) and torch.onnx.export (dynamo); io_metadata
    quantize.py       weight-only int8 / int4 with onnxruntime's MatMulNBits quantizer
    plugin_onnx.py    the same graphs in TensorRT plugin mode (PrefixKV custom ops)
    tensorrt.py       TensorRT engines from the plugin-mode graphs
    trtllm.py         the TensorRT-LLM window rule and sparse-attention extension

The pipeline that calls them is ``prefixkv.pipeline``; the folder format is ``prefixkv.engine_folder``.
"""
