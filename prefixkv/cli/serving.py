"""``prefixkv deploy`` and ``prefixkv serve``: parsing, then one library call each."""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from ..serving.repository import (
    MODEL_NAME,
    ModelSettings,
    check_repository,
    write_repository,
)
from ..serving.server import ServerError, TritonServer, check_ports, serve_forever
from ..serving.trtllm_repository import write_trtllm_repository
from . import args as a


def register(subparsers) -> None:
    p = subparsers.add_parser("deploy", help="write a Triton model repository for an engine",
                              description="Write a Triton model repository (model prefixkv_llm, Python backend) for an engine folder.")
    p.add_argument("engine", help="engine folder (from `prefixkv build`)")
    p.add_argument("--repository", default="triton_repo", help="model repository folder (default: triton_repo)")
    p.add_argument("--instances", type=a.positive_int, default=1, help="model instances (processes), each with its own engine session")
    p.add_argument("--threads", type=a.positive_int, default=None, help="intra-op threads per instance (default: the runtime's)")
    p.add_argument("--max-tokens", type=a.positive_int, default=64, help="max_tokens of requests that do not say (default 64)")
    p.add_argument("--max-batch-size", type=a.positive_int, default=8,
                   help="sequences each instance decodes together, joining and leaving between steps (default 8)")
    p.add_argument("--kv-cache-memory-mib", type=a.positive, default=None, metavar="MIB",
                   help="KV memory budget per instance: a request is admitted when its worst-case cache fits (default: no budget)")
    p.add_argument("--max-queue", type=a.positive_int, default=256,
                   help="requests that may wait for a free row; more are refused with an error (default 256)")
    a.add_chat(p)
    p.add_argument("--link", action="store_true", help="symlink the engine folder instead of copying it")
    a.add_force(p, "model folder")
    a.add_allow_failed(p)
    p.add_argument("--trtllm", metavar="REPOSITORY", help="also write the TensorRT-LLM (llmapi) variant into this repository")
    p.add_argument("--trtllm-model", help="model.yaml's model: a hub id or a path on the GPU machine (default: the engine's model folder)")
    p.add_argument("--trtllm-reference-tokens", type=a.positive_int, default=None,
                   help="prompt length whose per-layer memory the TensorRT-LLM windows match (default: the engine's context)")
    p.set_defaults(func=run_deploy)

    p = subparsers.add_parser("serve", help="start Triton Inference Server on a model repository",
                              description="Start tritonserver on REPOSITORY, wait until it is ready, stop it on Ctrl-C.")
    p.add_argument("repository", help="model repository (from `prefixkv deploy`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--http-port", type=a.port, default=8000)
    p.add_argument("--grpc-port", type=a.port, default=8001)
    p.add_argument("--metrics-port", type=a.port, default=8002)
    p.add_argument("--log-file", help="tritonserver log (default: a temporary file, printed at start)")
    p.add_argument("--log-verbose", type=a.count, default=0, help="tritonserver --log-verbose level")
    p.add_argument("--timeout", type=a.non_negative, default=300.0, help="seconds to wait for readiness")
    p.add_argument("--openai-port", type=a.port, default=None, metavar="PORT",
                   help="also serve an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions) on this port")
    p.add_argument("--openai-model", default=None, metavar="NAME",
                   help="the model name OpenAI clients pass (default: the Triton model's, prefixkv_llm)")
    p.set_defaults(func=run_serve)


def run_deploy(args) -> int:
    settings = ModelSettings(
        instances=args.instances, threads=args.threads, default_max_tokens=args.max_tokens, chat=args.chat,
        max_batch_size=args.max_batch_size, kv_cache_memory_mib=args.kv_cache_memory_mib, max_queue=args.max_queue,
        allow_failed_validation=args.allow_failed_validation,
    )
    model_dir = write_repository(args.engine, args.repository, settings, link=args.link, force=args.force)
    print(f"wrote {model_dir} (serve it with `prefixkv serve {args.repository}`)", file=sys.stderr)
    if args.trtllm:
        trt_dir = write_trtllm_repository(
            args.engine, args.trtllm, model=args.trtllm_model, reference_tokens=args.trtllm_reference_tokens,
            force=args.force,
        )
        print(f"wrote {trt_dir} (TensorRT-LLM llmapi layout; read {trt_dir / '1' / 'PREFIXKV.md'})", file=sys.stderr)
    return 0


def run_serve(args) -> int:
    try:
        engines = check_repository(args.repository, verify=True)
        ports = {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
        if args.openai_port is not None:
            ports["openai"] = args.openai_port
        if len(set(ports.values())) < len(ports):
            raise ServerError(f"two endpoints were given the same port ({', '.join(f'{k} {v}' for k, v in ports.items())}); "
                              "give each its own")
        check_ports(args.host, ports)
    except (OSError, ValueError, ServerError) as err:
        raise a.UserError(str(err).strip().splitlines()[0]) from err
    front_end = None
    if args.openai_port is not None:
        if MODEL_NAME not in engines:
            raise a.UserError(f"--openai-port needs a {MODEL_NAME} model in {args.repository} (from `prefixkv deploy`)")

        def front_end(server):
            from ..serving.openai import FrontEnd, OpenAIConfig

            config = OpenAIConfig(grpc_url=server.grpc_url, engine_dir=engines[MODEL_NAME], served_name=args.openai_model)
            return FrontEnd(config, host=args.host, port=args.openai_port).start()

    workspace = None if args.log_file else Path(tempfile.mkdtemp(prefix="prefixkv-serve-"))
    log_file = args.log_file or str(workspace / "tritonserver.log")
    server = TritonServer(
        args.repository, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        host=args.host, log_verbose=args.log_verbose, log_file=log_file,
    )
    failed = False
    try:
        return serve_forever(server, timeout=args.timeout, front_end=front_end)
    except (RuntimeError, OSError) as err:  # a ServerError (a RuntimeError) ends with the log's tail: its first line names the cause
        failed = True
        raise a.UserError(f"{str(err).strip().splitlines()[0]} (log: {log_file})") from err
    finally:
        if workspace is not None and not failed:  # a failed start keeps its log for reading
            shutil.rmtree(workspace, ignore_errors=True)
