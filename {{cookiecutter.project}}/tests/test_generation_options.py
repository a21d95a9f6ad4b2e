"""generate.py's options and inputs out of range: one line naming the option, exit status 2."""

import pytest
import torch

from {{cookiecutter.package}}.data.text import TextDataModule
from {{cookiecutter.package}}.data.tokenizer import train_tokenizer
from {{cookiecutter.package}}.errors import ConfigError
from {{cookiecutter.package}}.generation import check_sampling, complete, filter_logits, generate
from {{cookiecutter.package}}.networks import build_causal_lm, net_preset

from .conftest import run_script, tiny_gpt

TEXT = ["to be or not to be, that is the question", "whether tis nobler in the mind to suffer"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, 300)


def tiny_checkpoint(path, tokenizer, vocab_size: int = 300, max_length: int = 16) -> str:
    """What train.py writes, reduced to what generate.py reads: hyper-parameters, weights, tokenizer."""
    node = net_preset("tiny", vocab_size=vocab_size, max_length=max_length, num_layers=1, d_model=32)
    net = build_causal_lm(node, "tiny")
    torch.save(
        {
            "hyper_parameters": {"net": node},
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "TextDataModule": {"tokenizer": tokenizer.to_str()},
        },
        path,
    )
    return str(path)


@pytest.mark.parametrize(
    "option, message",
    [
        ("top_p=0.0", "top_p=0.0 is out of range: expected 0 < top_p <= 1, or null for no nucleus filter"),
        ("top_p=1.5", "top_p=1.5 is out of range"),
        ("temperature=-0.5", "temperature=-0.5 is out of range: expected a number >= 0 (0: greedy decoding)"),
        ("top_k=0", "top_k=0 is out of range: expected an integer >= 1, or null for no top-k filter"),
        ("top_k=-3", "top_k=-3 is out of range"),
    ],
)
def test_sampling_options_out_of_range_are_rejected_by_name(option, message):
    key, value = option.split("=")
    kwargs = {key: float(value) if "." in value else int(value)}
    with pytest.raises(ConfigError) as e:
        check_sampling(**kwargs)
    assert str(e.value) == message or str(e.value).startswith(message)
    if key != "temperature":
        with pytest.raises(ConfigError):
            filter_logits(torch.zeros(1, 5), **kwargs)


def test_the_edges_of_the_ranges_are_accepted():
    check_sampling(temperature=0, top_k=1, top_p=1.0)
    check_sampling(temperature=2.0, top_k=None, top_p=1e-6)
    logits = torch.tensor([[3.0, 2.0, 1.0]])
    assert filter_logits(logits, top_p=1e-6).isfinite().tolist() == [[True, False, False]]  # the top token stays
    assert filter_logits(logits, top_k=1).isfinite().tolist() == [[True, False, False]]


def test_a_prompt_longer_than_the_context_is_rejected(tokenizer):
    model = tiny_gpt(vocab_size=300, max_length=8, num_layers=1, d_model=32)
    prompt = " ".join(TEXT[:3])
    n = len(tokenizer.encode(prompt).ids)
    with pytest.raises(ConfigError, match=f"prompt is {n} tokens but the model's context is 8 tokens"):
        complete(model, tokenizer, prompt, max_new_tokens=4)
    assert generate(model, torch.zeros(1, 8, dtype=torch.long), 2).shape == (1, 10)  # a full context still runs


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["top_p=0.0"], "error: top_p=0.0 is out of range: expected 0 < top_p <= 1, or null for no nucleus filter"),
        (["prompt=" + "to be or not to be " * 10], "error: prompt is "),
        (["vocab"], "holds a tokenizer of 300 tokens for a model of 260: they were not trained together"),
    ],
)
def test_generate_py_reports_bad_options_in_one_line(tmp_path, tokenizer, overrides, message):
    """Through generate.py as a user runs it (the other options share check_sampling, tested above)."""
    vocab = 260 if overrides == ["vocab"] else 300
    ckpt = tiny_checkpoint(tmp_path / "tiny.ckpt", tokenizer, vocab_size=vocab)
    options = [] if overrides == ["vocab"] else overrides
    proc = run_script("generate.py", f"ckpt_path={ckpt}", *options, f"hydra.run.dir={tmp_path / 'gen'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr[-2000:]


def test_resuming_on_data_with_another_tokenizer_is_one_clear_error(tmp_path, corpus, tokenizer):
    dm = TextDataModule(paths=[str(corpus)], block_size=16, tokenizer={"vocab_size": 300}, cache_dir=str(tmp_path))
    dm.prepare_data()
    dm.setup("fit")
    dm.load_state_dict(dm.state_dict())  # its own: fine
    with pytest.raises(ConfigError, match=r"ckpt_path: the checkpoint's tokenizer \(300 tokens\) is not this data's"):
        dm.load_state_dict({"tokenizer": tokenizer.to_str()})
