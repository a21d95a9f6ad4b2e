"""serve.py with a CLIP checkpoint, over real HTTP on loopback: /embed and /similarity give the
pipeline's numbers, batch concurrent requests, and answer bad images with a 422 naming them."""

import asyncio
import base64
import io
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image, ImageDraw
from prometheus_client.parser import text_string_to_metric_families

from {{cookiecutter.package}}.pipeline import MultiModalPipeline
from {{cookiecutter.package}}.training import train

from .conftest import CLIP_TINY, ROOT, compose_at
from .live_server import LiveServer


@pytest.fixture(scope="module")
def clip_ckpt(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """The tiny CLIP on 32 px shapes after two steps."""
    out = tmp_path_factory.mktemp("serve-clip-train")
    overrides = [*CLIP_TINY, "trainer.max_steps=2", "trainer.val_check_interval=2"]
    cfg = compose_at(out, data_dir, None, overrides=overrides, tiny=False)
    train(cfg)
    return Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def server(clip_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    with LiveServer.on_free_port(clip_ckpt, tmp_path_factory.mktemp("serve-clip-run")) as live:
        yield live


def png(color: tuple[int, int, int], size: int = 48) -> bytes:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).ellipse((8, 8, size - 8, size - 8), fill=color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def batches(server: LiveServer) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    return sum(s.value for s in samples if s.name == "serve_batch_size_count" and s.labels["route"] == "/embed")


@pytest.mark.slow
def test_embed_and_similarity_give_the_pipelines_unit_vectors(server, clip_ckpt):
    texts = ["a red circle", "a blue square"]
    red = png((220, 20, 20))
    answer = httpx.post(f"{server.url}/embed", json={"text": texts, "image": b64(red)}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    text_features, image_features = torch.tensor(body["text_embeddings"]), torch.tensor(body["image_embeddings"])
    assert text_features.shape == (2, body["dim"]) and image_features.shape == (1, body["dim"])
    torch.testing.assert_close(text_features.norm(dim=1), torch.ones(2))
    pipeline = MultiModalPipeline.from_checkpoint(clip_ckpt, device="cpu")
    torch.testing.assert_close(text_features, pipeline.encode_text(texts), atol=1e-5, rtol=1e-4)
    image = Image.open(io.BytesIO(red)).convert("RGB")
    torch.testing.assert_close(image_features, pipeline.encode_images(image), atol=1e-5, rtol=1e-4)
    only_text = httpx.post(f"{server.url}/embed", json={"text": texts[0]}).json()
    assert len(only_text["text_embeddings"]) == 1 and only_text["image_embeddings"] == []

    similarity = httpx.post(f"{server.url}/similarity", json={"text": texts, "image": [b64(red)] * 2}).json()
    cosine = torch.tensor(similarity["similarity"])
    torch.testing.assert_close(cosine, (image_features @ text_features.T).expand(2, 2), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(similarity["probabilities"]).sum(1), torch.ones(2))
    health = httpx.get(f"{server.url}/health").json()
    assert health == {"status": "ok", "model": "clip", "embed_dim": body["dim"], "cache": "off"}


BAD = [
    ("/embed", {"image": "not base64!"}, "image[0]", "image[0]: not valid base64"),
    ("/embed", {"image": [b64(b"\x89PNG but not really")]}, "image[0]", "image[0]: cannot be decoded as an image"),
    ("/embed", {}, "text", "text: give a text or an image (or both)"),
    ("/embed", {"text": 5}, "text", "text: input should be a valid"),
    ("/embed", {"text": ["a"] * 65}, "text", "text: 65 items, over the limit of 64 per request"),
    ("/embed", {"text": "a", "images": []}, "images", "images: unknown field"),
    ("/similarity", {"text": ["a"]}, "image", "image: required: give at least one"),
]


@pytest.mark.slow
@pytest.mark.parametrize("route, body, field, message", BAD, ids=[f"{b[0][1:]}-{b[2]}" for b in BAD])
def test_a_bad_request_gets_a_422_naming_the_field_and_the_next_good_one_works(server, route, body, field, message):
    response = httpx.post(f"{server.url}{route}", json=body, timeout=60)
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and message in response.json()["error"]
    good = httpx.post(f"{server.url}/embed", json={"text": "a red circle", "image": b64(png((0, 0, 255)))})
    assert good.status_code == 200 and len(good.json()["image_embeddings"]) == 1


async def _burst(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return await asyncio.gather(*(client.post("/embed", json=b) for b in bodies))


@pytest.mark.slow
def test_concurrent_requests_share_batches_and_get_their_own_vectors(server):
    colors = [(40 * i, 255 - 40 * i, 100) for i in range(6)]
    bodies = [{"text": f"shape number {i}", "image": b64(png(colors[i % 6]))} for i in range(16)]
    before = batches(server)
    responses = asyncio.run(_burst(server.url, bodies))
    assert [r.status_code for r in responses] == [200] * 16
    assert batches(server) - before < 16, "no two concurrent requests shared a model call"
    for i in (0, 7):  # the same vectors as the request gets alone
        alone = httpx.post(f"{server.url}/embed", json=bodies[i]).json()
        for key in ("text_embeddings", "image_embeddings"):
            torch.testing.assert_close(
                torch.tensor(responses[i].json()[key]), torch.tensor(alone[key]), atol=1e-5, rtol=1e-4
            )


@pytest.mark.slow
def test_deploy_doc_python_example_runs_as_written(clip_ckpt, tmp_path):
    text = (ROOT / "docs" / "deploy.md").read_text()
    [example] = re.findall(r"```python\n(.*?)```", text, re.S)
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 8000))
        except OSError:
            pytest.skip("port 8000, which the documented example uses, is taken on this machine")
    (tmp_path / "cat.png").write_bytes(png((120, 80, 40)))
    with LiveServer(f"ckpt_path={clip_ckpt}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path):
        proc = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    probabilities = json.loads(proc.stdout)  # the printed list: one image, two texts
    assert len(probabilities) == 1 and abs(sum(probabilities[0]) - 1) < 1e-5
