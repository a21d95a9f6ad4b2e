"""serve.py with a GPT checkpoint, over real HTTP on loopback: generate.py's text, batching,
bad requests, Prometheus metrics, the Redis cache, startup errors and the load script."""

import asyncio
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from {{cookiecutter.package}}.training import train

from .conftest import ROOT, bash_block_lines, compose_at, run_script
from .live_server import LiveServer, RedisServer, free_port

PROMPT = "ROMEO:"


@pytest.fixture(scope="module")
def gpt_ckpt(tmp_path_factory: pytest.TempPathFactory, data_dir: Path, corpus: Path) -> Path:
    """The tiny GPT after two steps: weights and tokenizer as train.py writes them."""
    out = tmp_path_factory.mktemp("serve-train")
    cfg = compose_at(out, data_dir, corpus, overrides=["trainer.max_steps=2", "trainer.val_check_interval=2"])
    train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def server(gpt_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    with LiveServer.on_free_port(gpt_ckpt, tmp_path_factory.mktemp("serve-run")) as live:
        yield live


def post(server: LiveServer, route: str, body: dict | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{route}", content=content, timeout=120)


def metrics(server: LiveServer) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(name, sorted labels): value}, read with prometheus_client's parser."""
    response = httpx.get(f"{server.url}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def generate_py(ckpt: Path, tmp_path: Path, *overrides: str) -> str:
    """generate.py's continuation of PROMPT (its stdout is the prompt, the text and a newline)."""
    proc = run_script(
        "generate.py", f"ckpt_path={ckpt}", f"prompt={PROMPT}", "device=cpu", f"hydra.run.dir={tmp_path}", *overrides
    )
    assert proc.stdout.startswith(PROMPT) and proc.stdout.endswith("\n"), proc.stdout
    return proc.stdout[len(PROMPT) : -1]


@pytest.mark.slow
def test_greedy_and_seeded_generation_equal_generate_py(server, gpt_ckpt, tmp_path):
    greedy = post(server, "/generate", {"prompt": PROMPT, "max_new_tokens": 24, "temperature": 0})
    assert greedy.status_code == 200, greedy.text
    body = greedy.json()
    assert body["completion_tokens"] == 24 and body["prompt_tokens"] >= 1 and body["cached"] is False
    assert body["text"] == generate_py(gpt_ckpt, tmp_path / "g", "max_new_tokens=24", "temperature=0")
    sampled = {"prompt": PROMPT, "max_new_tokens": 24, "temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 11}
    seeded = post(server, "/generate", sampled).json()["text"]
    expected = generate_py(
        gpt_ckpt, tmp_path / "s", "max_new_tokens=24", "temperature=0.9", "top_k=50", "top_p=0.95", "seed=11"
    )
    assert seeded == expected
    assert post(server, "/generate", sampled).json()["text"] == seeded  # a seed repeats itself


async def _burst(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        return await asyncio.gather(*(client.post("/generate", json=b) for b in bodies))


def test_32_concurrent_requests_are_all_answered_in_shared_batches(server):
    bodies = []
    for i in range(32):
        body = {"prompt": PROMPT + " a" * (i % 3), "max_new_tokens": 4 + i % 5}
        body |= [{"temperature": 0}, {"temperature": 0.8}, {"temperature": 0.8, "seed": i}, {"top_p": 0.9}][i % 4]
        bodies.append(body)
    before = metrics(server)
    responses = asyncio.run(_burst(server.url, bodies))
    after = metrics(server)
    assert [r.status_code for r in responses] == [200] * 32, [r.text for r in responses if r.status_code != 200]
    assert [r.json()["completion_tokens"] for r in responses] == [b["max_new_tokens"] for b in bodies]
    batches = ("serve_batch_size_count", (("route", "/generate"),))
    requests = ("serve_batch_size_sum", (("route", "/generate"),))
    n_batches = after[batches] - before.get(batches, 0)
    assert after[requests] - before.get(requests, 0) == 32
    assert n_batches < 32, "no two concurrent requests shared a model call"
    # A seeded request is decoded on its own: the same text alone as in the crowd.
    for i in (2, 6):
        assert post(server, "/generate", bodies[i]).json()["text"] == responses[i].json()["text"]
    tokens = ("serve_generated_tokens_total", ())
    assert after[tokens] - before[tokens] == sum(b["max_new_tokens"] for b in bodies)


@pytest.mark.slow
def test_a_compiled_server_answers_as_the_eager_one_at_every_batch_size(server, gpt_ckpt, tmp_path):
    """server.compile: the decode step under torch.compile, a graph per power-of-two batch size
    (built at warm-up); greedy answers equal the eager server's, alone and in padded batches."""
    bodies = [{"prompt": PROMPT + " a" * i, "max_new_tokens": 6 + i, "temperature": 0} for i in range(3)]
    eager = [post(server, "/generate", b).json()["text"] for b in bodies]
    overrides = ["server.compile=default", "server.max_batch_size=2"]
    with LiveServer.on_free_port(gpt_ckpt, tmp_path, *overrides) as compiled:
        assert post(compiled, "/generate", bodies[0]).json()["text"] == eager[0]
        responses = asyncio.run(_burst(compiled.url, bodies))  # batches of 1 and 2 rows (run as 2)
        assert [r.json()["text"] for r in responses] == eager


LONG = PROMPT + " the" * 50  # over the test model's 32-token context (data.block_size=32)
BAD = [
    (b'{"max_new_tokens": 5}', 422, "prompt", "prompt: required"),
    (b'{"prompt": 5}', 422, "prompt", "prompt: input should be a valid string"),
    (b'{"prompt": "a", "max_new_tokens": "5"}', 422, "max_new_tokens", "valid integer"),
    (b'{"prompt": "a", "max_new_tokens": 2.5}', 422, "max_new_tokens", "valid integer"),
    (b'{"prompt": "a", "max_new_tokens": -3}', 422, "max_new_tokens", "must be in [1, 1024], got -3"),
    (b'{"prompt": "a", "max_new_tokens": 0}', 422, "max_new_tokens", "must be in [1, 1024], got 0"),
    (b'{"prompt": "a", "max_new_tokens": 100000}', 422, "max_new_tokens", "must be in [1, 1024], got 100000"),
    (b'{"prompt": "a", "max_new_tokens": 32}', 422, "max_new_tokens", "exceed the model's context of 32 tokens"),
    (json.dumps({"prompt": LONG}).encode(), 422, "prompt", "leave no room in the model's context of 32 tokens"),
    (b'{"prompt": "a", "top_p": 0}', 422, "top_p", "top_p: must be in (0, 1], got 0"),
    (b'{"prompt": "a", "top_p": 1.5}', 422, "top_p", "top_p: must be in (0, 1], got 1.5"),
    (b'{"prompt": "a", "temperature": -1}', 422, "temperature", "temperature: must be in [0, inf], got -1"),
    (b'{"prompt": "a", "top_k": -1}', 422, "top_k", "top_k: must be in [0, inf]"),
    (b'{"prompt": "a", "seed": -1}', 422, "seed", "seed: must be in [0,"),
    (b'{"prompt": "a", "temprature": 0}', 422, "temprature", "temprature: unknown field"),
    (b'{"prompt": "a",', 400, "body", "body: not valid JSON"),
    (b'["a"]', 422, "body", "body: expected a JSON object, got list"),
    (b"", 422, "body", "body: expected a JSON object, got nothing"),
    (b'{"prompt": "' + b"a" * 8_000_001 + b'"}', 413, "body", "body: over the 8000000-byte limit"),
]


@pytest.mark.parametrize("raw, status, field, message", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_a_bad_request_gets_a_4xx_naming_the_field_and_the_next_good_one_works(server, raw, status, field, message):
    response = post(server, "/generate", raw)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field
    assert message in response.json()["error"]
    good = post(server, "/generate", {"prompt": PROMPT, "max_new_tokens": 2})
    assert good.status_code == 200 and good.json()["completion_tokens"] == 2


def test_a_streamed_body_over_the_limit_is_cut_off_with_413(server):
    def chunks():
        for _ in range(10):
            yield b"x" * 1_000_000  # no Content-Length: the server counts as it reads

    response = httpx.post(f"{server.url}/generate", content=chunks(), timeout=60)
    assert response.status_code == 413 and response.json()["field"] == "body"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_unknown_routes_and_methods_are_json_errors(server):
    missing = httpx.get(f"{server.url}/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "GET /nope: Not Found"
    assert httpx.get(f"{server.url}/generate").status_code == 405
    health = httpx.get(f"{server.url}/health").json()
    assert health == {"status": "ok", "model": "gpt", "context": 32, "vocab_size": 512, "cache": "off"}


def test_metrics_parse_and_count_requests_latency_tokens_and_batches(server):
    before = metrics(server)
    assert post(server, "/generate", {"prompt": PROMPT, "max_new_tokens": 3, "temperature": 0}).status_code == 200
    assert post(server, "/generate", {"prompt": PROMPT, "top_p": 2}).status_code == 422
    after = metrics(server)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("serve_requests_total", route="/generate", status="200") == 1
    assert delta("serve_requests_total", route="/generate", status="422") == 1
    assert delta("serve_request_duration_seconds_count", route="/generate") == 2
    assert delta("serve_request_duration_seconds_bucket", route="/generate", le="+Inf") == 2
    assert delta("serve_generated_tokens_total") == 3
    assert delta("serve_prompt_tokens_total") == post(server, "/generate", {"prompt": PROMPT}).json()["prompt_tokens"]
    assert delta("serve_batch_size_count", route="/generate") == 1  # the 422 never reached the model
    assert ("serve_requests_in_flight", ()) in after


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed (make redis installs it)")
def test_redis_caches_deterministic_results_and_a_stopped_redis_costs_no_request(gpt_ckpt, tmp_path):
    store = RedisServer(free_port()).start()
    overrides = [f"server.cache_url={store.url}", "server.cache_retry_s=0.5"]
    greedy = {"prompt": PROMPT, "max_new_tokens": 8, "temperature": 0}
    try:
        with LiveServer.on_free_port(gpt_ckpt, tmp_path, *overrides) as live:
            assert httpx.get(f"{live.url}/health").json()["cache"] == "ok"
            first = post(live, "/generate", greedy).json()
            second = post(live, "/generate", greedy).json()
            assert (first["cached"], second["cached"]) == (False, True)
            assert second["text"] == first["text"]
            assert len(redis.Redis(port=store.port).keys("serve:generate:*")) == 1
            sampled = {"prompt": PROMPT, "max_new_tokens": 8, "temperature": 1.0}  # no seed: never cached
            assert [post(live, "/generate", sampled).json()["cached"] for _ in range(2)] == [False, False]
            counts = metrics(live)
            assert counts[("serve_cache_lookups_total", (("result", "hit"), ("route", "/generate")))] == 1
            assert counts[("serve_cache_lookups_total", (("result", "miss"), ("route", "/generate")))] == 1

            store.stop()  # Redis goes away mid-test: every request is still answered by the model
            for body in (greedy, {**greedy, "prompt": "JULIET:"}, greedy):
                response = post(live, "/generate", body)
                assert response.status_code == 200 and response.json()["cached"] is False
            assert response.json()["text"] == first["text"]
            assert httpx.get(f"{live.url}/health").json()["cache"] == "unavailable"
            errors = metrics(live)[("serve_cache_lookups_total", (("result", "error"), ("route", "/generate")))]
            assert errors >= 1
            assert "serving without the cache" in live.log()

            store.start()  # and comes back: after cache_retry_s the cache is used again
            time.sleep(0.6)
            assert [post(live, "/generate", greedy).json()["cached"] for _ in range(2)] == [False, True]
    finally:
        store.stop()


@pytest.mark.slow
def test_a_taken_port_and_a_bad_cache_url_are_one_line_errors(gpt_ckpt, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ("serve.py", f"ckpt_path={gpt_ckpt}", f"hydra.run.dir={tmp_path}", "server.warmup=false")
        proc = run_script(*args, f"server.port={port}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: server.host='127.0.0.1' server.port={port}: cannot listen there" in proc.stderr
    proc = run_script(*args, "server.cache_url=http://localhost:6379", check=False)
    assert proc.returncode == 2 and "error: server.cache_url='http://localhost:6379':" in proc.stderr
    proc = run_script(*args, "generate.top_p=3", check=False)
    assert proc.returncode == 2 and "error: generate.top_p: must be in (0, 1], got 3" in proc.stderr
    proc = run_script(*args, "server.compile=default", "server.max_batch_size=256", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    limit = "needs 9 compiled graphs, over torch.compile's limit of 8 per function: use server.max_batch_size <= 128"
    assert limit in proc.stderr


@pytest.mark.slow
def test_load_script_reports_latency_percentiles_and_throughput(server, gpt_ckpt):
    args = ["--url", server.url, "--route", "generate", "--clients", "1", "4", "--requests", "8"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), *args, "--reference", str(gpt_ckpt)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    rows = [line.split("|")[1:-1] for line in lines]
    assert [r[0].strip() for r in rows[1:]] == ["in-process generate()", "1", "4"], proc.stdout
    for row in rows[1:]:
        requests, errors, rps, p50, p95, p99, batch = (float(c) for c in row[1:])
        assert requests == 8 and errors == 0 and rps > 0 and 0 < p50 <= p95 <= p99 and batch >= 1
    remote = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), "--url", "http://10.1.2.3:8000"],
        capture_output=True,
        text=True,
    )
    assert remote.returncode == 2 and "loopback" in remote.stderr


def doc_commands() -> list[str]:
    return bash_block_lines((ROOT / "docs" / "deploy.md").read_text())


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.slow
def test_deploy_doc_commands_run_as_written(gpt_ckpt, tmp_path):
    """docs/deploy.md's shell lines: serve.py, curl and the load script run exactly as shown (from a
    folder where `make demo`'s checkpoint is the test checkpoint); docker and kubectl lines name
    the files test_deploy.py checks (there is no docker registry or cluster here)."""
    commands = doc_commands()
    starts = ("python serve.py ", "curl -s ", "python benchmarks/serve_load.py ", "docker ", "kubectl apply ")
    assert all(c.startswith(starts) for c in commands), [c for c in commands if not c.startswith(starts)]
    if not port_is_free(8000):
        pytest.skip("port 8000, which the documented commands use, is taken on this machine")
    checkpoints = tmp_path / "logs" / "demo" / "latest" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").symlink_to(gpt_ckpt)
    [serve_line] = [c for c in commands if c.startswith("python serve.py ")]
    with LiveServer(*shlex.split(serve_line)[2:], cwd=tmp_path) as live:
        assert live.url == "http://127.0.0.1:8000"
        for line in commands:
            if line.startswith("curl -s "):
                proc = subprocess.run(line, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=120)
                assert proc.returncode == 0, (line, proc.stderr)
                if "/metrics" in line:
                    assert any(f.name == "serve_requests" for f in text_string_to_metric_families(proc.stdout))
                else:
                    answer = json.loads(proc.stdout)
                    assert answer.get("status") == "ok" or answer.get("completion_tokens") == 20, answer
            elif line.startswith("python benchmarks/serve_load.py "):
                args = shlex.split(line)[2:]
                proc = subprocess.run(
                    [sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), *args],
                    cwd=tmp_path,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                assert proc.returncode == 0, proc.stderr[-2000:]
                assert [line.split("|")[1].strip() for line in proc.stdout.splitlines()[-3:]] == ["1", "8", "32"]
    for line in commands:
        if line.startswith("docker build "):
            words = shlex.split(line)
            assert (ROOT / words[words.index("-f") + 1]).is_file()
            image = words[words.index("-t") + 1]
            deployment = next(yaml.safe_load_all((ROOT / "deploy" / "k8s.yaml").read_text()))
            assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].startswith(image + ":")
        elif line.startswith("docker run "):
            assert "-p 8000:8000" in line and ":/models:ro" in line
        elif line.startswith("kubectl apply "):
            assert (ROOT / shlex.split(line)[-1]).is_file()
