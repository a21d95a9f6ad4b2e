"""The CLIP network: config checks, shapes, normalised features, logit scale, EOT pooling, presets,
and image-tower weights from a local file (with the network switched off)."""

import math
import socket

import pytest
import timm
import torch

from {{cookiecutter.package}}.errors import ConfigError
from {{cookiecutter.package}}.models.clip import CLIP, CLIPConfig
from {{cookiecutter.package}}.networks import build, net_preset

pytestmark = pytest.mark.usefixtures("single_thread")


# What the presets take from the data in train.py: a 512-token vocabulary, 16-token captions.
DATA = {"tokenizer": {"vocab_size": 512}, "context_length": 16, "image_size": 224}


def fields(name: str = "tiny", **overrides) -> dict:
    """A preset of configs/model/clip_net/ as CLIP keyword arguments."""
    node = net_preset(name, group="clip_net", data=DATA, **overrides)
    return {k: v for k, v in node.items() if k != "_target_"}


def tiny(**overrides) -> CLIP:
    torch.manual_seed(0)
    return CLIP(**fields(**overrides))


def captions(n: int, length: int = 16, eot: int = 0) -> torch.Tensor:
    """(n, length) random caption tokens of random lengths, padded with EOT."""
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 500, (n, length), generator=g)
    for i, end in enumerate(torch.randint(1, length, (n,), generator=g).tolist()):
        tokens[i, end:] = eot
    return tokens


def test_config_rejects_bad_values_naming_the_field(tmp_path):
    with pytest.raises(ValueError, match="text_width=64 must be divisible by text_heads=3"):
        tiny(text_heads=3)
    with pytest.raises(ConfigError, match="no network preset 'vit-h'"):
        net_preset("vit-h", group="clip_net")
    with pytest.raises(ValueError, match=r"unknown CLIPConfig keys \['depth'\]"):
        CLIPConfig.from_dict({**fields(), "depth": 3})
    with pytest.raises(ConfigError, match=r"model.net: unknown CLIPConfig keys \['depth'\]"):
        build(net_preset("tiny", group="clip_net", data=DATA, depth=3), "model.net")
    with pytest.raises(ValueError, match="'resnet_9000' is not a timm model"):
        tiny(image_model="resnet_9000")
    with pytest.raises(ValueError, match="nothing is downloaded"):
        tiny(image_model="hf-hub:timm/vit_base_patch16_224.augreg_in21k")
    with pytest.raises(ValueError, match="image_checkpoint=.*missing.pth' is not a file"):
        tiny(image_checkpoint=str(tmp_path / "missing.pth"))


@pytest.mark.parametrize(
    "image_model, image_kwargs",
    [
        ("resnet18", None),  # the preset's
        ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2)),
        ("test_convnext", {}),
    ],
)
def test_forward_gives_unit_features_and_the_initial_scale(image_model, image_kwargs):
    overrides = (
        dict(image_model=image_model)
        if image_kwargs is None
        else dict(image_model=image_model, image_kwargs=image_kwargs)
    )
    model = tiny(**overrides)
    out = model(torch.randn(3, 3, 32, 32), captions(3))
    assert out.image_features.shape == out.text_features.shape == (3, 32)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_features.norm(dim=-1), torch.ones(3))
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert out.logit_bias is None
    # Each side alone, for callers that need only one (zero-shot prompts, the pipeline).
    assert model(tokens=captions(2)).image_features is None
    assert model(images=torch.randn(2, 3, 32, 32)).text_features is None


def test_logit_scale_is_clamped_at_100_and_learnable_below():
    model = tiny()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model(tokens=captions(1)).logit_scale.item() == pytest.approx(100.0, rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
    scale = model(tokens=captions(1)).logit_scale
    scale.backward()
    assert scale.item() == pytest.approx(20.0, rel=1e-6) and model.logit_scale.grad.item() == pytest.approx(20.0)


@pytest.mark.parametrize("causal", [True, False])
def test_text_features_come_from_the_first_eot_and_ignore_what_follows(causal):
    model = tiny(text_causal=causal).eval()
    tokens = captions(4)
    changed = tokens.clone()
    for i in range(4):
        end = int((tokens[i] == 0).nonzero()[0])
        changed[i, end + 1 :] = torch.randint(1, 500, (16 - end - 1,))  # junk after the EOT
    torch.testing.assert_close(model.encode_text(tokens), model.encode_text(changed))
    # ... while a change before the EOT changes the features.
    changed[:, 0] = (tokens[:, 0] % 400) + 1
    assert not torch.allclose(model.encode_text(tokens), model.encode_text(changed))


def test_gradient_checkpointing_changes_memory_not_results():
    images, tokens = torch.randn(2, 3, 32, 32), captions(2)
    plain, ckpt = tiny(), tiny(gradient_checkpointing=True)
    for model in (plain, ckpt):
        out = model(images, tokens)
        (out.image_features @ out.text_features.T).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_vit_b_16_preset_has_openai_clip_size():
    with torch.device("meta"):
        model = CLIP(**fields("vit-b-16", vocab_size=49408, context_length=77))  # OpenAI CLIP's text sizes
    # 149.6M in OpenAI's ViT-B/16 CLIP; ours pads the vocabulary 49408 -> 49472 (+33K).
    assert model.num_params() / 1e6 == pytest.approx(149.6, abs=0.2)
    assert model.image_tower.num_classes == 0


def test_image_tower_loads_a_local_checkpoint_without_network(tmp_path, monkeypatch):
    config = CLIPConfig(**fields())
    # A timm model *with* its classifier, as a user's downloaded file would be.
    source = timm.create_model(config.image_model, pretrained=False, num_classes=10, **config.image_kwargs)
    torch.save(source.state_dict(), tmp_path / "tower.pth")

    def no_network(*args, **kwargs):
        raise AssertionError("tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = tiny(image_checkpoint=str(tmp_path / "tower.pth"))
    loaded = model.image_tower.state_dict()
    assert set(source.state_dict()) - set(loaded) == {"fc.weight", "fc.bias"}  # num_classes=0: no classifier
    for key, value in loaded.items():
        torch.testing.assert_close(value, source.state_dict()[key], msg=key)
