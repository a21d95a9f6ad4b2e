"""Load test of a running serve.py: latency percentiles and requests/s at several client counts.

    python serve.py ckpt_path=... &                  # the server, on 127.0.0.1:8000
    python benchmarks/serve_load.py --route generate --clients 1 8 32 --requests 64 --reference CKPT

Each client sends its next request as soon as the previous one is answered (closed loop); a level
ends after --requests requests or --max-seconds, whichever is first. The mean batch size comes
from the server's own /metrics. --reference CKPT adds the plain-PyTorch row: the same request run
in this process, one at a time, with no HTTP and no batching. Loopback addresses only.
"""

import argparse
import asyncio
import base64
import io
import sys
import time
from collections.abc import Callable
from urllib.parse import urlparse

import httpx
from prometheus_client.parser import text_string_to_metric_families

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
HEADER = "| clients | requests | errors | req/s | p50 ms | p95 ms | p99 ms | mean batch |"


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))]


def row(name: str, latencies: list[float], errors: int, seconds: float, batch: float) -> str:
    ms = sorted(t * 1000 for t in latencies)
    cells = [name, str(len(latencies)), str(errors), f"{len(latencies) / seconds:.1f}"]
    cells += [f"{percentile(ms, q):.1f}" for q in (50, 95, 99)] + [f"{batch:.2f}"]
    return "| " + " | ".join(cells) + " |"


def sample_image_png(size: int = 224) -> bytes:
    """A deterministic picture (a red disc on grey) as PNG bytes: nothing to download."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (128, 128, 128))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 30, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def request_body(args: argparse.Namespace) -> dict:
    if args.route == "generate":
        return {"prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    return {"text": args.caption, "image": base64.b64encode(sample_image_png()).decode()}


def batch_totals(url: str, route: str) -> tuple[float, float]:
    """(sum, count) of serve_batch_size for the route: requests and model calls so far."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    values = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("serve_batch_size") and s.labels.get("route") == f"/{route}"
    }
    return values.get("serve_batch_size_sum", 0.0), values.get("serve_batch_size_count", 0.0)


async def level(url: str, route: str, body: dict, clients: int, requests: int, max_seconds: float) -> str:
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + max_seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=max_seconds + 60, limits=limits) as client:

        async def one_client() -> None:
            nonlocal sent, errors
            while sent < requests and time.perf_counter() < deadline:
                sent += 1
                start = time.perf_counter()
                response = await client.post(f"/{route}", json=body)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors += 1

        for _ in range(min(clients, 4)):  # connections open and the model warm before timing
            await client.post(f"/{route}", json=body)
        before = batch_totals(url, route)
        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        seconds = time.perf_counter() - start
    after = batch_totals(url, route)
    batch = (after[0] - before[0]) / max(after[1] - before[1], 1)
    return row(str(clients), latencies, errors, seconds, batch)


def reference(args: argparse.Namespace) -> str:
    """The same request through the model in this process: one at a time, no HTTP, no batching."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    call: Callable[[], object]
    if args.route == "generate":
        from {{cookiecutter.package}}.generation import generate, load_checkpoint_for_generation

        model, tokenizer = load_checkpoint_for_generation(args.reference, device)
        ids = torch.tensor([tokenizer.encode(args.prompt).ids], device=device)

        def call() -> object:
            return generate(model, ids, args.max_new_tokens, args.temperature, 200).tolist()  # .tolist(): synchronised

        name = "in-process generate()"
    else:
        from PIL import Image

        from {{cookiecutter.package}}.pipeline import MultiModalPipeline

        pipeline = MultiModalPipeline.from_checkpoint(args.reference, device)
        image = Image.open(io.BytesIO(sample_image_png())).convert("RGB")

        def call() -> object:
            return pipeline.encode_text(args.caption).tolist(), pipeline.encode_images(image).tolist()

        name = "in-process encode()"
    for _ in range(3):
        call()
    latencies = []
    start = time.perf_counter()
    while len(latencies) < args.requests and time.perf_counter() - start < args.max_seconds:
        t = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t)
    return row(name, latencies, 0, time.perf_counter() - start, 1.0)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--route", choices=["generate", "embed"], default="generate")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=64, help="per client count (at most 10000)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per client count")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--caption", default="a red circle")
    parser.add_argument("--reference", metavar="CKPT", help="also time the model in this process (no server)")
    parser.add_argument("--device", help="for --reference (default: cuda when available)")
    args = parser.parse_args()
    host = urlparse(args.url).hostname
    if host not in LOOPBACK:
        fail(f"--url {args.url}: this load test only targets loopback ({', '.join(sorted(LOOPBACK))})")
    if not 1 <= args.requests <= 10_000 or not 0 < args.max_seconds <= 3600 or min(args.clients) < 1:
        fail("need 1 <= --requests <= 10000, 0 < --max-seconds <= 3600 and --clients >= 1")
    health = httpx.get(f"{args.url}/health", timeout=30).json()
    print(f"server: {health}; route /{args.route}; body {str(request_body(args))[:80]}...")
    print(HEADER)
    print("|" + " --- |" * 8)
    if args.reference:
        print(reference(args), flush=True)
    body = request_body(args)
    for clients in args.clients:
        print(asyncio.run(level(args.url, args.route, body, clients, args.requests, args.max_seconds)), flush=True)


if __name__ == "__main__":
    main()
