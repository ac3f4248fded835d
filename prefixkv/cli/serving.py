"""``prefixkv deploy`` and ``prefixkv serve``: parsing, then one library call each."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from ..serving.repository import check_repository, write_repository
from ..serving.server import ServerError, TritonServer, serve_forever
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
    p.set_defaults(func=run_serve)


def run_deploy(args) -> int:
    model_dir = write_repository(
        args.engine, args.repository, instances=args.instances, threads=args.threads,
        default_max_tokens=args.max_tokens, chat=args.chat, link=args.link, force=args.force,
        allow_failed_validation=args.allow_failed_validation,
    )
    print(f"wrote {model_dir} (serve it with `prefixkv serve {args.repository}`)", file=sys.stderr)
    if args.trtllm:
        trt_dir = write_trtllm_repository(
            args.engine, args.trtllm, model=args.trtllm_model, reference_tokens=args.trtllm_reference_tokens,
            force=args.force,
        )
        print(f"wrote {trt_dir} (TensorRT-LLM llmapi layout; read {trt_dir / '1' / 'PREFIXKV.md'})", file=sys.stderr)
    return 0


def run_serve(args) -> int:
    check_repository(args.repository)
    log_file = args.log_file or str(Path(tempfile.mkdtemp(prefix="prefixkv-serve-")) / "tritonserver.log")
    server = TritonServer(
        args.repository, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
        host=args.host, log_verbose=args.log_verbose, log_file=log_file,
    )
    try:
        return serve_forever(server, timeout=args.timeout)
    except ServerError as err:  # its message ends with the log's tail: the first line names the cause
        raise a.UserError(f"{str(err).strip().splitlines()[0]} (log: {log_file})") from err
