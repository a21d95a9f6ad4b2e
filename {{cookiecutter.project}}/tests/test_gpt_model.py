import math

import pytest
import torch

from {{cookiecutter.package}}.errors import ConfigError
from {{cookiecutter.package}}.generation import filter_logits, generate
from {{cookiecutter.package}}.models.gpt import GPT
from {{cookiecutter.package}}.networks import build_causal_lm, net_preset


def fields(name: str = "tiny", **overrides) -> dict:
    """A preset of configs/model/net/ as GPT keyword arguments (the demo's vocabulary and context)."""
    node = net_preset(name, **{"vocab_size": 2048, "max_length": 128, **overrides})
    return {k: v for k, v in node.items() if k != "_target_"}


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(**fields(**overrides))


def test_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValueError, match="d_model=130 must be divisible by num_heads=4"):
        tiny(d_model=130)
    with pytest.raises(ValueError, match="GPTConfig.num_layers must be a positive integer"):
        tiny(num_layers=0)
    with pytest.raises(ConfigError, match=r"model.net: .*GPT does not take these arguments: .*'depth'"):
        build_causal_lm(net_preset("tiny", vocab_size=256, max_length=16, depth=3), "model.net")
    with pytest.raises(ConfigError, match=r"model.net: GPTConfig.d_model=130 must be divisible by num_heads=4"):
        build_causal_lm(net_preset("tiny", vocab_size=256, max_length=16, d_model=130), "model.net")
    with pytest.raises(ConfigError, match=r"no network preset 'gpt5'"):
        net_preset("gpt5")
    with pytest.raises(ConfigError, match=r"network preset 'tiny' takes \['max_length', 'vocab_size'\] from the data"):
        net_preset("tiny")


def test_vocab_is_padded_to_a_multiple_of_64():
    assert tiny(vocab_size=50257).config.padded_vocab_size == 50304
    assert tiny(vocab_size=512).config.padded_vocab_size == 512
    assert tiny(vocab_size=300).lm_head.weight.shape == (320, 128)


@pytest.mark.parametrize(
    "name, millions",
    [("gpt2-124m", 124), ("gpt2-350m", 354), ("gpt2-774m", 773), ("gpt2-1.5b", 1557)],
)
def test_presets_have_gpt2_sizes(name, millions):
    with torch.device("meta"):
        model = GPT(**fields(name, vocab_size=50257, max_length=1024))  # GPT-2's vocabulary and context
    total = model.num_params(non_embedding=False)  # tied head counted once, padded vocab included
    assert abs(total / 1e6 - millions) / millions < 0.01, total


def test_weight_tying_shares_one_tensor():
    model = tiny()
    assert model.lm_head.weight is model.tok_emb.weight


def test_forward_shape_and_causality():
    model = tiny().eval()
    idx = torch.randint(0, 2048, (2, 16))
    logits = model(idx)
    assert logits.shape == (2, 16, 2048)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 2048
    # Positions before the change see the same prefix, so their logits must not move.
    torch.testing.assert_close(model(changed)[:, :10], logits[:, :10])
    assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])


def test_rejects_sequences_longer_than_max_length():
    with pytest.raises(ValueError, match="exceeds max_length=128"):
        tiny()(torch.zeros(1, 129, dtype=torch.long))


def test_initial_loss_is_near_uniform():
    # Small initial weights give near-uniform predictions: loss ~ ln(vocab).
    model = tiny(vocab_size=512)
    idx = torch.randint(0, 512, (4, 64))
    loss = model.loss(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - math.log(512)) < 0.15


def test_loss_matches_hand_computed_cross_entropy_with_ignore_index():
    model = tiny(vocab_size=256).eval()
    x = torch.randint(0, 256, (2, 8))
    y = torch.randint(0, 256, (2, 8))
    y[0, :3] = -100
    logits = model(x).double()
    log_probs = logits.log_softmax(-1)
    keep = y != -100
    expected = -log_probs[keep].gather(-1, y[keep].unsqueeze(-1)).mean()
    assert model.loss(x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randint(0, 2048, (2, 32))
    grads = []
    for ckpt in (False, True):
        model = tiny(gradient_checkpointing=ckpt)
        model.loss(x[:, :-1], x[:, 1:]).backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    # top_p=0.7: 0.5 alone is short of 0.7, 0.5+0.3 covers it: the first two stay.
    kept = filter_logits(logits, top_p=0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, top_p=0.4).isfinite()
    assert kept.tolist() == [[True, False, False, False]]


def test_generate_is_seeded_and_never_samples_padding_ids():
    model = tiny(vocab_size=300).eval()  # padded to 320: ids 300..319 must never appear
    prompt = torch.zeros(1, 3, dtype=torch.long)
    a = generate(model, prompt, 40, temperature=1.5, generator=torch.Generator().manual_seed(1))
    b = generate(model, prompt, 40, temperature=1.5, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 43) and torch.equal(a, b)
    assert int(a.max()) < 300
    greedy = generate(model, prompt, 5, temperature=0)
    assert torch.equal(greedy[:, 3], model(prompt)[:, -1, :300].argmax(-1))


def test_compile_units_keeps_parameter_names_and_results():
    from {{cookiecutter.package}}.parallel import compile_units

    eager, compiled = tiny(), tiny()
    compile_units(compiled, backend="eager")  # the plumbing; the inductor backend is exercised on GPUs
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = torch.randint(0, 2048, (2, 16))
    torch.testing.assert_close(compiled.loss(x[:, :-1], x[:, 1:]), eager.loss(x[:, :-1], x[:, 1:]))


def test_compile_units_leaves_a_zero3_partitioned_network_eager_with_a_warning():
    from {{cookiecutter.package}}.networks import compile_units

    model = tiny()
    plain_forward = [block.forward for block in model.blocks]
    for p in model.parameters():
        p.ds_id = 0  # what DeepSpeed's zero.Init puts on each parameter it partitions
    with pytest.warns(UserWarning, match="under DeepSpeed ZeRO-3: the units stay eager"):
        compile_units(model)
    assert [block.forward for block in model.blocks] == plain_forward
    assert "head_loss" not in vars(model)  # a compiled method would be an instance attribute


def test_layers_initialise_themselves_as_they_are_built():
    """GPT-2 init happens inside each layer's constructor (so DeepSpeed's zero.Init, which partitions
    every layer right after its constructor, still gets it): check the statistics on a wide model."""
    torch.manual_seed(0)
    model = tiny(vocab_size=4096, max_length=256, num_layers=8, d_model=512, num_heads=8)
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2*8)
    assert model.blocks[0].ln_1.weight.eq(1).all()
