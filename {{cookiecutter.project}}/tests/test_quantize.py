"""quantize.py (torchao post-training quantization), quantization-aware training, and loading a
quantized checkpoint where any checkpoint loads (generate.py)."""

import re
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

pytest.importorskip("torchao")

from {{cookiecutter.package}}.checkpoints import read_checkpoint
from {{cookiecutter.package}}.errors import ConfigError, UserInputError
from {{cookiecutter.package}}.generation import generate, load_checkpoint_for_generation
from {{cookiecutter.package}}.models.gpt import GPT
from {{cookiecutter.package}}.quantize import prepare_qat, quantize_net, run, state_bytes
from {{cookiecutter.package}}.training import train

from .conftest import compose_at, run_script, tiny_gpt


def tiny() -> GPT:
    torch.manual_seed(0)
    return tiny_gpt().eval()


@pytest.mark.slow
def test_an_int8_network_decodes_the_same_tokens_compiled_and_eager():
    """The compiled decode step unwraps torchao's weight subclasses into plain tensors first
    (generation.compiled_decode); greedy tokens stay those of the eager int8 network, across prompt
    lengths sharing one cache length."""
    torch.manual_seed(0)
    model = quantize_net(tiny(), "int8_weight_only").eval()
    prompts = [torch.randint(0, model.config.vocab_size, (2, n)) for n in (5, 9)]
    eager = [generate(model, p, 8, temperature=0) for p in prompts]
    torch._dynamo.reset()
    compiled = [generate(model, p, 8, temperature=0, compile="default", cache_length=20) for p in prompts]
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled, strict=True))
    assert not any("Int8Tensor" in type(p).__name__ for p in model.parameters())  # unwrapped


def test_int8_weights_are_about_4x_smaller_than_float32_and_2x_than_bfloat16():
    fp32 = state_bytes(tiny())
    bf16 = state_bytes(tiny().to(torch.bfloat16))
    int8 = state_bytes(quantize_net(tiny(), "int8_weight_only"))
    assert 3.6 < fp32 / int8 < 4.0  # per-row float scales and the LayerNorms stay in float
    assert 1.8 < bf16 / int8 < 2.0


@pytest.mark.parametrize("method", ["int8_weight_only", "int8_dynamic"])
def test_quantized_gpt_keeps_its_tie_and_predictions_and_decodes_with_the_cache(method):
    model = tiny()
    idx = torch.randint(0, 2048, (2, 24), generator=torch.Generator().manual_seed(0))
    reference = model(idx)
    quantize_net(model, method)
    assert model.lm_head.weight is model.tok_emb.weight  # one int8 tensor for embedding and head
    assert type(model.lm_head.weight).__name__ == "Int8Tensor"
    logits = model(idx)
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    cached = generate(model, idx[:, :8], 16, temperature=0)
    assert torch.equal(cached, generate(model, idx[:, :8], 16, temperature=0, use_cache=False))


def test_qat_fake_quantizes_training_and_keeps_parameter_names():
    plain, qat = tiny(), prepare_qat(tiny(), "int8_dynamic")
    assert list(qat.state_dict()) == list(plain.state_dict())  # its checkpoint loads into a plain GPT
    assert type(qat.blocks[0].attn.qkv).__name__ == "FakeQuantizedLinear"
    x = torch.randint(0, 2048, (2, 16))
    loss = qat.loss(x[:, :-1], x[:, 1:])
    assert loss.item() != pytest.approx(plain.loss(x[:, :-1], x[:, 1:]).item(), abs=1e-6)  # rounding is simulated
    loss.backward()
    assert qat.blocks[0].attn.qkv.weight.grad.abs().sum() > 0  # straight-through gradients
    with pytest.raises(ConfigError, match="model.qat='int4': expected null, int8_weight_only or int8_dynamic"):
        prepare_qat(tiny(), "int4")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir, corpus) -> tuple[Path, list[str]]:
    """A tiny GPT trained for 4 steps with quantization-aware training (model.qat), and the data
    overrides quantize.py needs to validate it on the same windows."""
    out = tmp_path_factory.mktemp("qat")
    train(compose_at(out, data_dir, corpus, overrides=["model.qat=int8_dynamic", "logger=csv"]))
    GlobalHydra.instance().clear()
    data = [
        "data=text",
        f"data.paths=[{corpus}]",
        "data.tokenizer.vocab_size=512",
        "data.block_size=32",
        "data.val_windows=8",
        f"paths.data_dir={data_dir}",
        "trainer=cpu",
        "quantize.decode.new_tokens=8",
        "quantize.decode.repeats=1",
    ]
    return out / "out" / "checkpoints" / "last.ckpt", data


@pytest.mark.slow
def test_quantize_py_prints_the_table_and_writes_a_checkpoint_generate_py_loads(trained, tmp_path):
    ckpt, data = trained
    proc = run_script("quantize.py", f"ckpt_path={ckpt}", *data, f"hydra.run.dir={tmp_path / 'q'}")
    header, _, *rows = [line for line in proc.stdout.splitlines() if " | " in line or "-|-" in line]
    assert header.split(" | ")[0].strip() == "weights" and "decode_tok_s" in header
    names = [r.split(" | ")[0].strip() for r in rows]
    assert names == ["float32", "bfloat16", "int8_weight_only"]
    sizes = [float(r.split(" | ")[1]) for r in rows]
    assert 3.5 < sizes[0] / sizes[2] < 4.1 and 1.7 < sizes[1] / sizes[2] < 2.1
    losses = [float(r.split(" | ")[2]) for r in rows]
    assert abs(losses[2] - losses[0]) < 0.05 * losses[0]  # int8 barely moves the loss
    out = ckpt.with_name("last-int8_weight_only.ckpt")
    assert f"quantized checkpoint: {out}" in proc.stdout
    assert read_checkpoint(out)["quantization"]["method"] == "int8_weight_only"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary file left

    model, tokenizer = load_checkpoint_for_generation(str(out))
    assert type(model.blocks[0].mlp.fc.weight).__name__ == "Int8Tensor"
    assert model.lm_head.weight is model.tok_emb.weight
    proc = run_script("generate.py", f"ckpt_path={out}", "prompt=ROMEO:", "max_new_tokens=12", "num_samples=2",
                      f"hydra.run.dir={tmp_path / 'g'}")  # fmt: skip
    assert proc.stdout.count("ROMEO:") == 2 and "sample 2" in proc.stdout


def test_bad_input_gets_one_clear_error(trained, tmp_path, data_dir):
    ckpt, data = trained
    not_a_model = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, not_a_model)
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    methods = r"\['float8_dynamic', 'int8_dynamic', 'int8_weight_only'\]"
    cases = [
        (["quantize.method=int3"], rf"quantize.method='int3' is not a quantization method; expected one of {methods}"),
        (
            ["quantize.method=float8_dynamic"],
            r"quantize.method=float8_dynamic needs a CUDA GPU of compute capability 8.9 or newer and this run is "
            r"on cpu; methods that run here: \['int8_dynamic', 'int8_weight_only'\]",
        ),
        (
            [f"ckpt_path={not_a_model}"],
            rf"ckpt_path: {not_a_model} holds no GPT.* network written by train.py "
            r"\(expected hyper_parameters.net; the file has \[\]\)",
        ),
        ([f"ckpt_path={text}"], rf"ckpt_path='{text}' is not a readable checkpoint: truncated, corrupt or not written"),
        ([f"ckpt_path={tmp_path / 'missing.ckpt'}"], r"is not a file \(expected a .ckpt written by train.py\)"),
    ]
    for overrides, message in cases:
        cfg = compose_at(tmp_path, data_dir, None, "quantize",
                         [f"ckpt_path={ckpt}", *data, "device=cpu", *overrides], tiny=False)  # fmt: skip
        with pytest.raises(UserInputError, match=message):
            run(cfg)
    assert not (ckpt.parent / "last-int3.ckpt").exists() and not (ckpt.parent / "last-float8_dynamic.ckpt").exists()
    # As a user sees it: one line on stderr, exit status 2.
    proc = run_script("quantize.py", f"ckpt_path={ckpt}", "quantize.method=int3", "device=cpu", check=False,
                      cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert re.fullmatch(r"error: quantize.method='int3' is not a quantization method; .*\n", proc.stderr)
