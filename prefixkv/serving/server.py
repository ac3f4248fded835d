"""Start a real Triton Inference Server on a model repository and stop it cleanly.

The ``tritonserver`` binary is taken from PATH (an NGC container, a source build) or from
the nvidia-pytriton wheel, which ships a complete Triton build:

* the binary: ``pytriton/tritonserver/bin/tritonserver``;
* its shared libraries: ``nvidia_pytriton.libs`` (added to ``LD_LIBRARY_PATH``);
* the Python backend: ``pytriton/tritonserver/backends/python/libtriton_python.so``, whose
  stub (``triton_python_backend_stub``) is shipped once per Python version under
  ``pytriton/tritonserver/python_backend_stubs/X.Y``.  Triton looks for the stub next to
  ``libtriton_python.so``, so (as PyTriton itself does) the backend folder is copied into a
  per-server workspace with the stub for the running Python version beside it; the wheel
  in the virtual environment is never modified.

The stub embeds the system's libpython of that version and finds its ``sys.path`` from the
``python3`` first on ``PATH``, so the folder of the running interpreter is put first on
``PATH``: the model then imports numpy, onnxruntime, tokenizers and jinja2 from this
environment (stdlib extension modules of another patch build may not load there, which
is why the served model imports nothing more; see ``prefixkv.serving.templates.model``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


class ServerError(RuntimeError):
    """The server could not be found, started, or did not become ready."""


class TritonNotFoundError(FileNotFoundError):
    """No ``tritonserver`` binary, with the fix."""


@dataclass
class TritonDistribution:
    """Where a runnable ``tritonserver`` and its pieces are.

    backend_dir: the folder to copy as ``--backend-directory`` (None: the binary's default);
    libs_dir: extra shared libraries for ``LD_LIBRARY_PATH`` (None: none needed);
    stub: the Python backend stub to place next to ``libtriton_python.so`` (None: in place).
    """

    binary: Path
    backend_dir: Path | None = None
    libs_dir: Path | None = None
    stub: Path | None = None
    source: str = "PATH"


def find_tritonserver() -> TritonDistribution:
    """A ``tritonserver`` on PATH, else the one inside the nvidia-pytriton wheel."""
    on_path = shutil.which("tritonserver")
    if on_path:
        default_backends = Path("/opt/tritonserver/backends")
        return TritonDistribution(Path(on_path), default_backends if default_backends.is_dir() else None)
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFoundError(
            "no tritonserver found: put Triton's tritonserver on PATH (e.g. run inside an NGC "
            "tritonserver container) or install the wheel that bundles it: pip install nvidia-pytriton"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    binary = root / "tritonserver" / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not binary.is_file():
        raise TritonNotFoundError(f"{binary} is missing from the nvidia-pytriton wheel; reinstall it: pip install --force-reinstall nvidia-pytriton")
    if not stub.is_file():
        shipped = sorted(p.name for p in (root / "tritonserver" / "python_backend_stubs").glob("*"))
        raise TritonNotFoundError(
            f"nvidia-pytriton has no Python backend stub for Python {version} (it has {', '.join(shipped)}); "
            "run prefixkv from one of those Python versions"
        )
    return TritonDistribution(
        binary=binary,
        backend_dir=root / "tritonserver" / "backends",
        libs_dir=root.parent / "nvidia_pytriton.libs",
        stub=stub,
        source="nvidia-pytriton",
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for tests and defaults)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class TritonServer:
    """One ``tritonserver`` process serving ``repository`` on ``host``.

        with TritonServer("triton_repo", http_port=8000) as server:
            server.wait_ready()
            ...

    Ports left as None are chosen free at start.  ``stop()`` sends SIGINT (Triton unloads
    its models and exits) and kills the process if it has not exited in ``exit_timeout``.
    """

    def __init__(
        self,
        repository: str | Path,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        host: str = "127.0.0.1",
        log_verbose: int = 0,
        exit_timeout: float = 30.0,
        log_file: str | Path | None = None,
        extra_args: list[str] | None = None,
    ):
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise FileNotFoundError(f"no model repository at {self.repository}; write one with `prefixkv deploy ENGINE --repository {repository}`")
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.log_verbose = log_verbose
        self.exit_timeout = exit_timeout
        self.extra_args = list(extra_args or [])
        self._log_file = Path(log_file) if log_file else None
        self._workspace: Path | None = None
        self._log_handle = None
        self.process: subprocess.Popen | None = None

    # -- addresses --------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    # -- lifecycle --------------------------------------------------------------------
    def command(self, dist: TritonDistribution, backend_dir: Path | None) -> list[str]:
        args = [
            str(dist.binary),
            f"--model-repository={self.repository}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            f"--exit-timeout-secs={int(self.exit_timeout)}",
        ]
        if backend_dir is not None:
            args.append(f"--backend-directory={backend_dir}")
        return args + self.extra_args

    def environment(self, dist: TritonDistribution) -> dict[str, str]:
        env = os.environ.copy()
        if dist.libs_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (env.get("LD_LIBRARY_PATH"), str(dist.libs_dir)) if p)
        # the Python backend stub finds its sys.path from the first python3 on PATH
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def _prepare_backends(self, dist: TritonDistribution) -> Path | None:
        if dist.stub is None:
            return dist.backend_dir
        backends = self._workspace / "backends"
        shutil.copytree(dist.backend_dir, backends, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(dist.stub, backends / "python" / "triton_python_backend_stub")
        return backends

    def start(self) -> TritonServer:
        if self.process is not None:
            raise ServerError("this server is already started")
        dist = find_tritonserver()
        # a per-server workspace: the backends folder with the stub, and the log unless given
        self._workspace = Path(tempfile.mkdtemp(prefix="prefixkv-triton-"))
        backend_dir = self._prepare_backends(dist)
        self.log_path = self._log_file or (self._workspace / "tritonserver.log")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            self.command(dist, backend_dir),
            env=self.environment(dist),
            stdout=self._log_handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal reaches us; we stop Triton ourselves
        )
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (AttributeError, OSError):
            return ""

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = 180.0, poll: float = 0.5) -> TritonServer:
        """Block until ``/v2/health/ready`` answers 200; raise if the process dies or time runs out."""
        if self.process is None:
            raise ServerError("start() the server first")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise ServerError(f"tritonserver exited with code {code} before it was ready; its log ends with:\n{self.log_tail()}")
            if self.is_ready():
                return self
            time.sleep(poll)
        raise ServerError(f"tritonserver was not ready after {timeout:.0f}s; its log ends with:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """Stop the server (SIGINT, then SIGKILL after the exit timeout); returns its exit code.
        If Triton has not exited 5 s before its exit timeout, the Python backend stubs are sent
        SIGUSR1: ``prefixkv_llm`` then writes every thread's stack to the log."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGINT)
                early = max(self.exit_timeout - 5, 1.0)
                try:
                    self.process.wait(timeout=early)
                except subprocess.TimeoutExpired:
                    self._dump_stubs(early)
                try:
                    self.process.wait(timeout=self.exit_timeout + 5 - early)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=10)
            code = self.process.returncode
            self.process = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
        if self._workspace is not None:  # the default log goes with it; a --log-file stays
            shutil.rmtree(self._workspace, ignore_errors=True)
        self._workspace = None
        return code

    def _dump_stubs(self, waited: float) -> None:
        """Ask each Python backend stub under this server for its threads' stacks (SIGUSR1)."""
        stubs = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                name, rest = stat.read_text().rsplit(")", 1)
                if rest.split()[1] == str(self.process.pid) and name.split("(", 1)[1].startswith("triton_python"):
                    stubs.append(int(stat.parent.name))
        if self._log_handle is not None:
            self._log_handle.write(f"prefixkv: tritonserver has not exited {waited:.0f}s after SIGINT; "
                                   f"the stacks of its Python stubs {stubs} follow\n".encode())
            self._log_handle.flush()
        for pid in stubs:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGUSR1)

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Raise ServerError naming the first of ``ports`` ({what: port}) that cannot be bound on ``host``."""
    for what, number in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no obstacle
            try:
                sock.bind((host, number))
            except OSError as err:
                flag = "--" + what.replace(" ", "-") + "-port"
                raise ServerError(f"port {number} on {host} ({what}) is in use or cannot be bound ({err.strerror}); "
                                  f"stop what holds it or choose another with {flag}") from None


class _Stop(Exception):
    """SIGTERM or SIGHUP: stop like Ctrl-C."""


@contextlib.contextmanager
def _stop_on_signals():
    """Within the block SIGTERM and SIGHUP raise ``_Stop`` (SIGINT raises KeyboardInterrupt), so the
    caller's cleanup runs; the previous handlers come back after."""
    def stop(signum, frame):
        raise _Stop(signal.Signals(signum).name)

    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT)}  # restored after the cleanup ignored it
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread: no handlers (tests calling from a thread)
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):  # not the main thread; a handler set outside Python
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def serve_forever(server: TritonServer, timeout: float = 300.0, out=sys.stderr, front_end=None) -> int:
    """Start ``server`` (and then ``front_end(server)``, a callable returning an object with
    ``url`` and ``stop()``), wait for readiness, print the endpoints and block until Ctrl-C,
    SIGTERM or SIGHUP; everything started is stopped and its temporary folders removed."""
    started = None
    with _stop_on_signals():
        try:
            server.start()
            server.wait_ready(timeout)
            started = front_end(server) if front_end is not None else None
            print(
                f"Triton is serving {server.repository}\n"
                f"  HTTP    http://{server.http_url}  (generate: POST /v2/models/<model>/generate, generate_stream)\n"
                f"  gRPC    {server.grpc_url}\n"
                f"  metrics http://{server.host}:{server.metrics_port}/metrics\n"
                + (f"  OpenAI  {started.url}  (/models, /completions, /chat/completions)\n" if started is not None else "")
                + f"  log     {server.log_path}\n"
                "Press Ctrl-C to stop.",
                file=out,
                flush=True,
            )
            while server.process is not None and server.process.poll() is None:
                time.sleep(0.5)
            code = server.process.returncode if server.process is not None else 0
            print(f"tritonserver exited with code {code}; its log ends with:\n{server.log_tail()}", file=out)
            return code or 1
        except (KeyboardInterrupt, _Stop) as why:
            print(f"stopping Triton ({why or 'SIGINT'})...", file=out, flush=True)
            return 0
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the cleanup short
                with contextlib.suppress(ValueError):
                    signal.signal(sig, signal.SIG_IGN)
            if started is not None:
                started.stop()
            server.stop()
