"""POST /generate: continue a prompt with the checkpoint's GPT, many requests per model call.

A request leaves out any field but `prompt`; the server's defaults (configs/serve.yaml, `generate:`)
fill the rest. Rows of one batch are decoded together by `generation.generate_batch` (prompts of
any lengths, left-padded, through the KV cache) when they can share its arguments: greedy rows
(temperature 0) always, sampled rows without a seed when their temperature, top-k and top-p
agree. A seeded row is decoded on its
own with `torch.Generator().manual_seed(seed)`, exactly as generate.py does, so a seeded request
gives generate.py's text for that seed whatever else is in the batch.

With `server.compile` set, the one-token step runs under torch.compile (generation.compiled_decode):
its cache spans the whole context and a batch is padded up to a power of two (repeating its last
prompt; the extra rows are thrown away), so one compiled graph per power of two serves every
request. Those graphs are built at warm-up, before the server listens.
"""

from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import torch
from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict
from tokenizers import Tokenizer

from ..data.tokenizer import decode_utf8, eot_id
from ..errors import ConfigError
from ..generation import generate_batch
from ..models.gpt import GPT
from .app import Serving
from .validation import BadRequest, check_range, parse_body


def bucket(n: int) -> int:
    """The batch size a compiled server runs n rows at: the next power of two."""
    return 1 << (n - 1).bit_length()


def buckets(max_batch_size: int) -> list[int]:
    """Every batch size a compiled server with up to max_batch_size rows runs at, smallest first: the
    powers of two up to bucket(max_batch_size), one compiled graph each."""
    return [1 << i for i in range(bucket(max_batch_size).bit_length())]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None  # 0 or null: no top-k filter
    top_p: float | None = None  # null: no nucleus filter
    seed: int | None = None


@dataclass(frozen=True)
class Job:
    """A validated request with the defaults filled in: what the model runs and the cache key holds."""

    prompt: str
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int | None

    @property
    def deterministic(self) -> bool:
        return self.temperature == 0 or self.seed is not None


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int


class TextGenerator:
    kind = "gpt"
    batch_route = "/generate"

    def __init__(
        self,
        model: GPT,
        tokenizer: Tokenizer,
        device: str,
        defaults: dict[str, Any],
        max_new_tokens_limit: int,
        compile: str | None = None,
        max_batch_size: int = 1,
    ) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.compile, self.max_batch_size = compile, max_batch_size
        graphs = len(buckets(max_batch_size))
        if compile is not None and graphs > torch._dynamo.config.recompile_limit:
            raise ConfigError(
                f"server.compile={compile!r} with server.max_batch_size={max_batch_size} needs {graphs} compiled "
                f"graphs, over torch.compile's limit of {torch._dynamo.config.recompile_limit} per function: "
                f"use server.max_batch_size <= {1 << (torch._dynamo.config.recompile_limit - 1)}"
            )
        self.context = model.config.max_length
        self.max_new_tokens_limit = max_new_tokens_limit
        self.eot = eot_id(tokenizer)
        self.sampler = torch.Generator(device=device)  # rows without a seed share it
        self.sampler.seed()
        unknown = sorted(set(defaults) - set(GenerateRequest.model_fields) - {"prompt"})
        missing = sorted(set(GenerateRequest.model_fields) - {"prompt"} - set(defaults))
        if unknown or missing:
            raise ConfigError(f"generate: unknown keys {unknown}, missing keys {missing}")
        try:  # the configured defaults obey the same rules as requests
            self.defaults = self.check(Job(prompt="", **defaults), ids=None)
        except BadRequest as e:
            raise ConfigError(f"generate.{e}") from None

    def resolve(self, request: GenerateRequest, ids: list[int]) -> Job:
        """The request with the server's defaults for what it left out (null max_new_tokens or
        temperature too; null top_k, top_p and seed mean no filter and no seed), checked. The
        default max_new_tokens shrinks to what the context leaves after the prompt; a number the
        request gives does not."""
        given = request.model_dump(exclude_unset=True)
        given = {k: v for k, v in given.items() if v is not None or k in ("top_k", "top_p", "seed")}
        values = {**asdict(self.defaults), **given}
        if "max_new_tokens" not in given:
            values["max_new_tokens"] = max(1, min(values["max_new_tokens"], self.context - len(ids)))
        return self.check(Job(**values), ids)

    def check(self, job: Job, ids: list[int] | None) -> Job:
        """Range checks; with the prompt's ids, also that prompt and new tokens fit the context."""
        check_range("max_new_tokens", job.max_new_tokens, 1, self.max_new_tokens_limit)
        check_range("temperature", job.temperature, 0, None)
        if job.top_k is not None:
            check_range("top_k", job.top_k, 0, None)
        if job.top_p is not None:
            check_range("top_p", job.top_p, 0, 1, low_open=True)
        if job.seed is not None:
            check_range("seed", job.seed, 0, 2**63 - 1)
        if ids is None:
            return job
        if len(ids) >= self.context:
            raise BadRequest(
                "prompt", f"{len(ids)} tokens leave no room in the model's context of {self.context} tokens"
            )
        if len(ids) + job.max_new_tokens > self.context:
            raise BadRequest(
                "max_new_tokens",
                f"{job.max_new_tokens} new tokens after a {len(ids)}-token prompt exceed the model's context of "
                f"{self.context} tokens (at most {self.context - len(ids)} here)",
            )
        return job

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt).ids or [self.eot]  # an empty prompt starts a new document

    @torch.no_grad()
    def run_batch(self, items: list[tuple[Job, list[int]]]) -> list[Completion]:
        """Decode every item; rows that can share one `generate_batch` call do (see the module docstring)."""
        groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, (job, _) in enumerate(items):
            if job.temperature == 0:
                key: tuple[Any, ...] = ("greedy",)
            elif job.seed is not None:
                key = ("seeded", i)
            else:
                key = (job.temperature, job.top_k, job.top_p)
            groups[key].append(i)
        out: list[Completion | None] = [None] * len(items)
        for rows in groups.values():
            job = items[rows[0]][0]
            steps = max(items[i][0].max_new_tokens for i in rows)
            generator = self.sampler
            if job.temperature != 0 and job.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(job.seed)
            # Prompts of different lengths decode together (left-padded, through the KV cache).
            prompts = [items[i][1] for i in rows]
            if self.compile is not None:  # one compiled graph per power of two (see the module docstring)
                prompts += prompts[-1:] * (bucket(len(prompts)) - len(prompts))
            ids = generate_batch(
                self.model, prompts, steps, job.temperature, job.top_k, job.top_p, generator,
                compile=self.compile, cache_length=self.context if self.compile else None,
            )  # fmt: skip
            for row, i in enumerate(rows):
                new = ids[row][: items[i][0].max_new_tokens]  # a row cut to its own length: decoding is causal
                text = decode_utf8(self.tokenizer, new)  # whole characters, as generate.py prints
                out[i] = Completion(text, len(self.tokenizer.encode(items[i][0].prompt).ids), len(new))
        return out  # type: ignore[return-value]

    def warmup(self) -> None:
        """A short decode before the first request: CUDA context, kernels and allocator warmed up; with
        `compile`, every batch size a request can meet is compiled (two tokens: the first comes from
        the prefill, the second from the compiled step)."""
        job = Job("", max_new_tokens=1 if self.compile is None else 2, temperature=0, top_k=None, top_p=None, seed=None)
        sizes = [1] if self.compile is None else buckets(self.max_batch_size)
        for size in sizes:
            self.run_batch([(job, [self.eot])] * size)

    def describe(self) -> dict[str, Any]:
        return {"model": "gpt", "context": self.context, "vocab_size": self.model.config.vocab_size}

    def add_routes(self, app: FastAPI, serving: Serving) -> None:
        @app.post("/generate")
        async def generate_route(request: Request) -> dict[str, Any]:
            body = parse_body(await request.body(), GenerateRequest)
            ids = self.encode(body.prompt)
            job = self.resolve(body, ids)

            async def compute() -> dict[str, Any]:
                completion = await serving.batcher.submit((job, ids))
                serving.metrics.prompt_tokens.inc(completion.prompt_tokens)
                serving.metrics.generated_tokens.inc(completion.completion_tokens)
                return asdict(completion)

            return await serving.cached("/generate", asdict(job) if job.deterministic else None, compute)
