"""Contrastive losses against float64 hand references, and across 2 real processes (gloo): the
gathered loss and its gradients equal the single-process loss on the concatenated batch."""

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from {{cookiecutter.package}}.losses.contrastive import InfoNCELoss, SigmoidLoss, build_contrastive_loss

pytestmark = pytest.mark.usefixtures("single_thread")


def features(n: int, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1)
    return image, text


def infonce_by_hand(image: list[list[float]], text: list[list[float]], scale: float) -> float:
    """-log softmax of the matching pair, per image over captions and per caption over images, averaged."""
    n = len(image)
    dot = [[sum(a * b for a, b in zip(image[i], text[j])) * scale for j in range(n)] for i in range(n)]
    i2t = -sum(dot[i][i] - math.log(sum(math.exp(dot[i][j]) for j in range(n))) for i in range(n)) / n
    t2i = -sum(dot[j][j] - math.log(sum(math.exp(dot[i][j]) for i in range(n))) for j in range(n)) / n
    return (i2t + t2i) / 2


def sigmoid_by_hand(image: list[list[float]], text: list[list[float]], scale: float, bias: float) -> float:
    """-sum over all pairs of log sigmoid(+-logit), + for matching pairs, divided by the batch size."""
    n = len(image)
    total = 0.0
    for i in range(n):
        for j in range(n):
            logit = sum(a * b for a, b in zip(image[i], text[j])) * scale + bias
            sign = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-sign * logit))  # -log sigmoid(sign * logit)
    return total / n


def test_infonce_equals_the_float64_hand_reference():
    image, text = features(6)
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    out = InfoNCELoss()(image, text, scale)
    expected = infonce_by_hand(image.tolist(), text.tolist(), scale.item())
    assert out["loss"].dtype == torch.float64
    assert out["loss"].item() == pytest.approx(expected, rel=1e-12)
    assert out["loss"].item() == pytest.approx((out["image_to_text"] + out["text_to_image"]).item() / 2, rel=1e-12)


def test_sigmoid_equals_the_float64_hand_reference():
    image, text = features(5, seed=1)
    scale, bias = torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    out = SigmoidLoss()(image, text, scale, bias)
    assert out["loss"].item() == pytest.approx(sigmoid_by_hand(image.tolist(), text.tolist(), 10.0, -10.0), rel=1e-12)
    with pytest.raises(ValueError, match="logit_bias_init"):
        SigmoidLoss()(image, text, scale)


def test_low_precision_features_get_a_float32_loss():
    image, text = features(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = InfoNCELoss()(image.bfloat16(), text.bfloat16(), torch.tensor(100.0))
    expected = infonce_by_hand(image.bfloat16().double().tolist(), text.bfloat16().double().tolist(), 100.0)
    assert out["loss"].dtype == torch.float32
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_unknown_loss_name_is_rejected():
    with pytest.raises(ValueError, match="model.loss='triplet'.*infonce"):
        build_contrastive_loss("triplet")


WORLD, PER_RANK = 2, 3


def _global_batch() -> dict[str, torch.Tensor]:
    image, text = features(WORLD * PER_RANK, seed=7)
    return {
        "image": image,
        "text": text,
        "scale": torch.tensor(14.0, dtype=torch.float64),
        "bias": torch.tensor(-3.0, dtype=torch.float64),
    }


def _loss_and_grads(name: str, image, text, scale, bias) -> dict[str, torch.Tensor]:
    leaves = {
        k: v.clone().requires_grad_(True) for k, v in dict(image=image, text=text, scale=scale, bias=bias).items()
    }
    loss_fn = build_contrastive_loss(name)
    loss = loss_fn(leaves["image"], leaves["text"], leaves["scale"], leaves["bias"] if name == "sigmoid" else None)
    loss["loss"].backward()
    grads = {f"grad_{k}": v.grad if v.grad is not None else torch.zeros_like(v) for k, v in leaves.items()}
    return {"loss": loss["loss"].detach(), **grads}


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        batch = _global_batch()
        mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        results = {
            name: _loss_and_grads(name, batch["image"][mine], batch["text"][mine], batch["scale"], batch["bias"])
            for name in ("infonce", "sigmoid")
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_gathered_loss_over_two_processes_equals_the_global_batch_loss(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    batch = _global_batch()
    for name in ("infonce", "sigmoid"):
        single = _loss_and_grads(name, batch["image"], batch["text"], batch["scale"], batch["bias"])
        per_rank = [r[name] for r in ranks]
        # DDP and FSDP average gradients over ranks; the reported loss is the mean over ranks too.
        loss = sum(r["loss"] for r in per_rank) / WORLD
        torch.testing.assert_close(loss, single["loss"], rtol=1e-12, atol=0, msg=name)
        for r, result in enumerate(per_rank):
            mine = slice(r * PER_RANK, (r + 1) * PER_RANK)
            for key in ("grad_image", "grad_text"):
                torch.testing.assert_close(
                    result[key] / WORLD, single[key][mine], rtol=1e-10, atol=1e-14, msg=f"{name} {key} rank {r}"
                )
        for key in ("grad_scale", "grad_bias"):
            averaged = sum(r[key] for r in per_rank) / WORLD
            torch.testing.assert_close(averaged, single[key], rtol=1e-10, atol=1e-14, msg=f"{name} {key}")
        # Not trivially equal: a rank's own loss differs from the global one.
        assert abs(per_rank[0]["loss"].item() - single["loss"].item()) > 1e-6
