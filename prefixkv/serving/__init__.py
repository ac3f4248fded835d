"""Serving on Triton Inference Server.

    prefixkv deploy engines/NAME --repository triton_repo     # prefixkv.serving.repository
    prefixkv serve triton_repo                                # prefixkv.serving.server

``repository``: writes the ``prefixkv_llm`` model (Python backend, decoupled) whose
``model.py`` is ``templates/model.py``; ``trtllm_repository``: the TensorRT-LLM llmapi
variant; ``server``: finds and runs ``tritonserver``; ``client``: HTTP generate and gRPC
streaming helpers; ``pbtxt``: config.pbtxt checks with Triton's ModelConfig protobuf.
Submodules are imported on use.
"""
