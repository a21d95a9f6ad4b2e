"""The causal-LM protocol (networks.py) with the GPT, and a network chosen in config from outside
the package: a GPT subclass with one extra keyword, trained through `model/net=<its yaml>`."""

import math

import pytest
import torch

from {{cookiecutter.package}}.errors import ConfigError
from {{cookiecutter.package}}.models.gpt import GPT
from {{cookiecutter.package}}.networks import CONFIGS, CausalLM, build, build_causal_lm, check_causal_lm, net_preset
from {{cookiecutter.package}}.training import train


class ScaledEmbeddingGPT(GPT):
    """A paper's variant, outside the package: token embeddings multiplied by `emb_scale`."""

    def __init__(self, *, emb_scale: float, **fields) -> None:
        super().__init__(**fields)
        self.emb_scale = emb_scale
        self.tok_emb.register_forward_hook(lambda module, args, out: out * self.emb_scale)


def tiny_node(**overrides) -> dict:
    return net_preset("tiny", vocab_size=300, max_length=16, **overrides)


def test_the_gpt_follows_the_protocol_and_counts_its_flops_by_hand():
    net = build_causal_lm(tiny_node(), "model.net")
    assert isinstance(net, CausalLM)
    c = net.config
    n = sum(p.numel() for p in net.parameters()) - net.pos_emb.weight.numel()  # tied head once, no positions
    assert net.num_params() == n
    assert net.flops_per_token(16) == 6 * n + 12 * c.num_layers * c.d_model * 16  # PaLM appendix B


def test_the_loss_is_over_the_real_vocabulary_only():
    """Padding columns (300..319) take no probability: the loss ignores whatever they hold."""
    torch.manual_seed(0)
    net = build_causal_lm(tiny_node(), "model.net").eval()
    x = torch.randint(0, 300, (2, 12))
    before = net.loss(x[:, :-1], x[:, 1:])
    with torch.no_grad():
        net.tok_emb.weight[300:] = 5 * torch.randn(20, 128)  # the tied head's padding rows: large logits
    logits = net(x[:, :-1]).double()
    expected = torch.nn.functional.cross_entropy(logits[..., :300].flatten(0, 1), x[:, 1:].flatten())
    assert net.loss(x[:, :-1], x[:, 1:]).item() == pytest.approx(before.item(), rel=1e-6)
    assert net.loss(x[:, :-1], x[:, 1:]).item() == pytest.approx(expected.item(), rel=1e-6)
    assert logits[..., 300:].abs().max() > 1  # the padding columns did change


def test_build_names_the_key_for_every_kind_of_mistake():
    with pytest.raises(ConfigError, match=r"model.net must be a config node with a _target_"):
        build({"num_layers": 2}, "model.net")
    with pytest.raises(ConfigError, match=r"model.net._target_='GPT' is not a dotted path"):
        build({"_target_": "GPT"}, "model.net")
    with pytest.raises(ConfigError, match=r"model.net._target_='torch.nn.Nope' cannot be imported"):
        build({"_target_": "torch.nn.Nope"}, "model.net")
    with pytest.raises(ConfigError, match=r"model.net: .*GPT does not take these arguments: missing a required"):
        build({"_target_": f"{GPT.__module__}.GPT", "vocab_size": 300}, "model.net")
    with pytest.raises(ConfigError, match=r"model.net._target_=torch.nn.Linear is not a causal language model"):
        check_causal_lm(torch.nn.Linear(2, 2), "model.net._target_=torch.nn.Linear")
    partial = build({"_target_": "torch.nn.Linear", "_partial_": True, "in_features": 3}, "x", out_features=2)
    assert partial().weight.shape == (2, 3)


def test_a_subclass_with_one_extra_keyword_trains_through_its_yaml(compose_cfg, tmp_path):
    folder = tmp_path / "configs" / "model" / "net"
    folder.mkdir(parents=True)
    tiny = (CONFIGS / "model" / "net" / "tiny.yaml").read_text()
    (folder / "scaled.yaml").write_text(
        tiny.replace(f"{GPT.__module__}.GPT", f"{__name__}.ScaledEmbeddingGPT") + "emb_scale: 2.0\n"
    )
    quiet = ["callbacks.progress_bar=null", "callbacks.model_summary=null", "callbacks.text_samples=null"]
    cfg = compose_cfg(overrides=[f"hydra.searchpath=[file://{tmp_path / 'configs'}]", "model/net=scaled", *quiet])
    assert cfg.model.net.emb_scale == 2.0
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"])
    ckpt = torch.load(f"{cfg.paths.output_dir}/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["net"]["_target_"] == f"{__name__}.ScaledEmbeddingGPT"
    assert ckpt["hyper_parameters"]["net"]["emb_scale"] == 2.0
    # Rebuilt from the stored node alone (what generate.py does in a fresh process): the same logits.
    from {{cookiecutter.package}}.generation import load_network_checkpoint

    net, _ = load_network_checkpoint(f"{cfg.paths.output_dir}/checkpoints/last.ckpt")
    assert type(net) is ScaledEmbeddingGPT and net.emb_scale == 2.0
    plain = GPT(**{k: v for k, v in ckpt["hyper_parameters"]["net"].items() if k not in ("_target_", "emb_scale")})
    plain.load_state_dict(net.state_dict())
    x = torch.randint(0, 300, (1, 8))
    assert not torch.allclose(net.eval()(x), plain.eval()(x))  # the extra keyword is in effect
