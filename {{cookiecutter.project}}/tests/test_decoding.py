"""KV-cache decoding (models/gpt.py init_cache + decode, generation.generate) against the path that
recomputes the whole context for every token: the same tokens, greedy and seeded sampling, batched
prompts of different lengths, prompts at and past the length limit."""

import importlib.util

import pytest
import torch
from torch import nn

from {{cookiecutter.package}}.generation import generate, generate_batch
from {{cookiecutter.package}}.models.gpt import GPT

from .conftest import ROOT, tiny_gpt


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return tiny_gpt(**overrides).eval()


def prompt(batch: int, length: int, vocab: int = 2048, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_prefill_and_one_token_steps_give_the_forward_logits():
    model = tiny()
    idx = prompt(2, 12)
    cache = model.init_cache(2, 12)
    first = model.decode(idx[:, :8], torch.arange(8), cache)  # prefill 8 tokens
    torch.testing.assert_close(first, model(idx[:, :8])[:, -1], atol=1e-5, rtol=1e-5)
    for t in range(8, 12):  # then one token per step
        step = model.decode(idx[:, t : t + 1], torch.tensor([t]), cache)
        torch.testing.assert_close(step, model(idx[:, : t + 1])[:, -1], atol=1e-5, rtol=1e-5)


def test_greedy_equals_the_no_cache_path_token_for_token():
    model = tiny()
    idx = prompt(3, 10)
    cached = generate(model, idx, 40, temperature=0)
    recomputed = generate(model, idx, 40, temperature=0, use_cache=False)
    assert cached.shape == (3, 50)
    assert torch.equal(cached, recomputed)


def test_seeded_sampling_equals_the_no_cache_path():
    model = tiny()
    idx = prompt(2, 6)
    kwargs = dict(temperature=1.0, top_k=50, top_p=0.95)
    cached = generate(model, idx, 30, generator=torch.Generator().manual_seed(3), **kwargs)
    recomputed = generate(model, idx, 30, generator=torch.Generator().manual_seed(3), use_cache=False, **kwargs)
    assert torch.equal(cached, recomputed)
    other_seed = generate(model, idx, 30, generator=torch.Generator().manual_seed(4), **kwargs)
    assert not torch.equal(cached, other_seed)  # the equality above is not a constant output


def test_batched_prompts_of_different_lengths_equal_each_prompt_alone():
    model = tiny()
    prompts = [prompt(1, n, seed=n)[0].tolist() for n in (3, 11, 7, 1)]
    batched = generate_batch(model, prompts, 25, temperature=0)
    for p, new in zip(prompts, batched):
        alone = generate(model, torch.tensor([p]), 25, temperature=0, use_cache=False)
        assert new == alone[0, len(p) :].tolist()
    # The padding values are never read: other filler, same tokens.
    T = 11
    idx = torch.full((4, T), 7)
    for b, p in enumerate(prompts):
        idx[b, T - len(p) :] = torch.tensor(p)
    lengths = torch.tensor([len(p) for p in prompts])
    assert generate(model, idx, 25, temperature=0, lengths=lengths)[:, T:].tolist() == batched
    # The path without a cache takes the same padded batch (row by row) and agrees.
    assert generate(model, idx, 25, temperature=0, lengths=lengths, use_cache=False)[:, T:].tolist() == batched


def test_prompt_at_the_length_limit_and_decoding_past_it_slide_the_window():
    """Defined behaviour past max_length: the context is the last max_length tokens (a sliding window),
    with or without a cache. Position embeddings shift every step there, so the cached path
    recomputes the window each step and must still agree token for token."""
    model = tiny(max_length=16)
    for length in (16, 13, 20):  # at the limit, crossing it while decoding, and a prompt already past it
        idx = prompt(2, length)
        cached = generate(model, idx, 12, temperature=0)
        assert torch.equal(cached, generate(model, idx, 12, temperature=0, use_cache=False)), length
        assert cached.shape == (2, length + 12)
    # The first new token of a prompt at the limit is the forward's prediction for the whole prompt.
    idx = prompt(1, 16)
    assert int(generate(model, idx, 1, temperature=0)[0, -1]) == int(model(idx)[0, -1, :2048].argmax())
    # Ragged rows crossing the limit: each row slides its own window.
    prompts = [prompt(1, n, seed=n)[0].tolist() for n in (15, 4)]
    for p, new in zip(prompts, generate_batch(model, prompts, 10, temperature=0)):
        assert new == generate(model, torch.tensor([p]), 10, temperature=0, use_cache=False)[0, len(p) :].tolist()


def test_stop_token_ends_rows_and_the_batch():
    model = tiny()
    idx = prompt(2, 5)
    free = generate(model, idx, 20, temperature=0)
    stop = int(free[0, 8])  # row 0's 4th new token
    stopped = generate(model, idx, 20, temperature=0, stop_token=stop)
    row0 = stopped[0, 5:].tolist()
    assert row0[: row0.index(stop) + 1] == free[0, 5 : 5 + row0.index(stop) + 1].tolist()
    assert set(row0[row0.index(stop) :]) == {stop}  # after stopping a row repeats the stop token
    lists = generate_batch(model, idx.tolist(), 20, temperature=0, stop_token=stop)
    assert lists[0][-1] == stop and lists[0] == row0[: row0.index(stop) + 1]


class NoCache(nn.Module):
    """A network of the model protocol without a cache: a forward and a config, nothing else."""

    def __init__(self, gpt: GPT) -> None:
        super().__init__()
        self.gpt, self.config = gpt, gpt.config

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx)


def test_a_network_without_a_cache_is_decoded_by_recomputing():
    model = tiny()
    idx = prompt(2, 6)
    assert torch.equal(generate(NoCache(model), idx, 15, temperature=0), generate(model, idx, 15, temperature=0))


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    model = tiny()
    idx = prompt(2, 6)
    torch._dynamo.reset()
    compiled = generate(model, idx, 12, temperature=0, compile="default")  # Inductor, fullgraph, static shapes
    assert torch.equal(compiled, generate(model, idx, 12, temperature=0))
    # A second call reuses the static cache (stale values from the first call are never read).
    other = prompt(2, 6, seed=5)
    again = generate(model, other, 12, temperature=0, compile="default")
    assert torch.equal(again, generate(model, other, 12, temperature=0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(idx=torch.zeros(3, dtype=torch.long)), r"idx must be \(batch, length\)"),
        (dict(lengths=torch.tensor([2, 9])), r"lengths must hold 2 prompt lengths in \[1, 4\], got \[2, 9\]"),
        (dict(lengths=torch.tensor([0, 1])), r"lengths must hold 2 prompt lengths"),
        (dict(max_new_tokens=-1), "max_new_tokens and temperature must be >= 0"),
    ],
)
def test_malformed_batches_are_rejected_by_name(kwargs, message):
    args = dict(idx=torch.zeros(2, 4, dtype=torch.long), max_new_tokens=3) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(tiny(), **args)


def test_cache_length_is_checked():
    with pytest.raises(ValueError, match=r"cache length 200 must be in \[1, max_length=128\]"):
        tiny().init_cache(1, 200)


def load_benchmark():
    spec = importlib.util.spec_from_file_location("decode_benchmark", ROOT / "benchmarks" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_decode_benchmark_prints_the_reference_and_cached_rows(capsys):
    # float8 needs a recent CUDA GPU: on the CPU its row says why it did not run, and the others run.
    rows = load_benchmark().main(
        ["--device", "cpu", "--batch", "1", "3", "--new-tokens", "4", "--warmup", "0", "--repeats", "1",
         "--compile", "none", "--weights", "float", "int8_weight_only", "float8_dynamic"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert [(r["weights"], r["path"], r["batch"]) for r in rows] == [
        (w, p, b) for w in ("fp32", "int8_weight_only") for b in (1, 3) for p in ("no-cache", "cache")
    ]
    assert all(r["ttft_ms"] > 0 and r["e2e_ms"] > 0 and r["decode_tok_s"] > 0 for r in rows)
    assert rows[0]["size_MB"] / rows[-1]["size_MB"] > 3.5  # the int8 rows' weights
    assert "float8_dynamic    -             -  failed: --weights=float8_dynamic needs a CUDA GPU" in out
    header = out.splitlines()[1].split()
    assert header == ["weights", "path", "batch", "ttft_ms", "e2e_ms", "decode_tok_s", "size_MB"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--new-tokens", "1"], "--new-tokens must be at least 2"),
        (["--batch", "0"], "--batch sizes must be positive"),
        (["--weights", "int3"], "argument --weights: invalid choice: 'int3'"),
    ],
)
def test_decode_benchmark_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_benchmark().main(["--device", "cpu", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
