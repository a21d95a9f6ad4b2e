"""The inference server behind `python serve.py ckpt_path=...` (FastAPI + uvicorn).

FastAPI rather than LitServe: both batched 32 concurrent requests into the same batch sizes here,
but LitServe runs the model in a worker process behind a queue, which was slower at 1 and 8
clients on a CPU and would put the batch metrics and startup errors in another process
(docs/deploy.md has the numbers).
"""

import logging
import socket
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, DataPathError
from .app import Backend, build_app
from .metrics import Metrics

log = logging.getLogger(__name__)


def checkpoint_kind(ckpt_path: str) -> str:
    """'gpt' or 'clip': what a checkpoint written by train.py holds, read without loading tensors."""
    path = Path(ckpt_path)
    if not path.exists():
        raise DataPathError(f"ckpt_path={ckpt_path!r} does not exist (expected a .ckpt written by train.py)")
    if path.is_dir():
        package = __package__.rsplit(".", 1)[0]
        raise DataPathError(
            f"ckpt_path={ckpt_path!r} is a sharded checkpoint folder; consolidate it into one file first: "
            f"python -m {package}.checkpoints {ckpt_path} full.ckpt"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"ckpt_path={ckpt_path!r} cannot be read as a PyTorch checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("hyper_parameters", {}).get("net"), dict):
        raise ConfigError(f"ckpt_path={ckpt_path!r} holds no network (expected a .ckpt written by train.py)")
    states = [v for v in ckpt.values() if isinstance(v, dict)]
    if any("image_model" in v for v in states):
        return "clip"
    if any(v.get("tokenizer") for v in states):
        return "gpt"
    raise ConfigError(f"ckpt_path={ckpt_path!r} holds neither a GPT with its tokenizer nor a CLIP model")


def load_backend(cfg: Any) -> Backend:
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but no CUDA GPU is available (device=cpu serves on the CPU)")
    kind = checkpoint_kind(cfg.ckpt_path)
{%- if cookiecutter.gpt %}
    if kind == "gpt":
        from ..generation import load_checkpoint_for_generation
        from .generate import TextGenerator

        model, tokenizer = load_checkpoint_for_generation(cfg.ckpt_path, device)
        server = cfg.server
        return TextGenerator(
            model, tokenizer, device, dict(cfg.generate), server.max_new_tokens, server.compile, server.max_batch_size
        )
{%- endif %}
{%- if cookiecutter.clip %}
    if kind == "clip":
        from ..pipeline import MultiModalPipeline
        from .embed import Embedder

        return Embedder(MultiModalPipeline.from_checkpoint(cfg.ckpt_path, device), cfg.server.max_items)
{%- endif %}
    raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} holds a {kind.upper()} model, which this project does not include")


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, bound before the server starts: a taken port is a one-line error, and
    port 0 picks a free one (tests)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise ConfigError(f"server.host={host!r} server.port={port}: cannot listen there ({e.strerror or e})") from None
    return sock


def serve(cfg: Any) -> None:
    """serve.py: cfg is configs/serve.yaml (ckpt_path, device, server, and the request defaults)."""
    import uvicorn

    from .cache import ResultCache, model_fingerprint

    backend = load_backend(cfg)
    metrics = Metrics()
    server = cfg.server
    cache = None
    if server.cache_url:
        fingerprint = model_fingerprint(cfg.ckpt_path)
        cache = ResultCache(
            server.cache_url, fingerprint, metrics, server.cache_ttl_s, server.cache_timeout_s, server.cache_retry_s
        )
    app = build_app(backend, server, metrics, cache)
    sock = listen(server.host, server.port)
    if server.warmup:
        backend.warmup()
    host, port = sock.getsockname()[:2]
    log.info("serving %s from %s on http://%s:%d", backend.kind, cfg.ckpt_path, host, port)
    config = uvicorn.Config(app, log_config=None, log_level=server.log_level, access_log=server.access_log)
    uvicorn.Server(config).run(sockets=[sock])
