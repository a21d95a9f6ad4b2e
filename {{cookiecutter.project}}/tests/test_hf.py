"""Hugging Face GPT-2 in and out (hf.py), against transformers' own GPT2LMHeadModel.

No download: a small random GPT2LMHeadModel is saved with save_pretrained, beside a tokenizer.json
trained on the test corpus (300 tokens, so the vocabulary is padded to 320 here)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from {{cookiecutter.package}}.data.text import list_files, read_documents
from {{cookiecutter.package}}.data.tokenizer import train_tokenizer
from {{cookiecutter.package}}.generation import load_network_checkpoint
from {{cookiecutter.package}}.training import train

from .conftest import ROOT, run_script

transformers = pytest.importorskip("transformers")  # the optional extra: pip install -e ".[hf]"

VOCAB = 300
QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null", "callbacks.text_samples=null"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, corpus) -> Path:
    """A GPT-2 folder as save_pretrained writes it, every weight random (biases and norms too)."""
    folder = tmp_path_factory.mktemp("hf") / "gpt2-small-random"
    tokenizer = train_tokenizer(read_documents(list_files([str(corpus)]), "text"), VOCAB)
    assert tokenizer.get_vocab_size() == VOCAB
    eot = tokenizer.token_to_id("<|endoftext|>")
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=eot, eos_token_id=eot
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def hf_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m {{cookiecutter.package}}.hf ARGS` in a fresh process, as docs/gpt.md shows it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, "-m", "{{cookiecutter.package}}.hf", *args]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def cli_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    """What `python -m {{cookiecutter.package}}.hf ARGS` prints when it exits with status 2 (run in
    this process: the same main, without a second interpreter's start-up)."""
    from {{cookiecutter.package}}.hf import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr and stderr.count("\n") == 1  # one line
    return stderr


def hf_model(folder: Path):
    return transformers.GPT2LMHeadModel.from_pretrained(folder).eval()


def tokens(n: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "gpt2.ckpt"
    proc = hf_cli("import", str(hf_dir), str(out))
    assert proc.stdout.strip() == str(out)
    return out


def test_imported_logits_and_loss_match_transformers(hf_dir, imported):
    ours, tokenizer = load_network_checkpoint(str(imported))
    ours.eval()
    theirs = hf_model(hf_dir)
    x = tokens()
    with torch.no_grad():
        logits = ours(x)  # (B, T, 320): the padded vocabulary
        expected = theirs(x).logits  # (B, T, 300)
        assert logits.shape == (2, 40, 320) and expected.shape == (2, 40, VOCAB)
        assert (logits[..., :VOCAB] - expected).abs().max().item() <= 1e-5
        # transformers shifts the labels itself; ours takes the shifted targets.
        hf_loss = theirs(x, labels=x).loss
        assert ours.loss(x[:, :-1], x[:, 1:]).item() == pytest.approx(hf_loss.item(), abs=1e-6)
    assert ours.config.bias is True and ours.config.dropout == pytest.approx(0.1)  # GPT-2's biases and dropout
    assert json.loads(tokenizer.to_str()) == json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    checkpoint = torch.load(imported, weights_only=True)  # plain containers only
    assert checkpoint["hyper_parameters"]["net"]["_target_"] == "{{cookiecutter.package}}.models.gpt.GPT"


def test_export_then_import_is_bitwise_and_transformers_loads_the_export(hf_dir, imported, tmp_path):
    from {{cookiecutter.package}}.hf import import_checkpoint

    out_dir = tmp_path / "exported"
    hf_cli("export", str(imported), str(out_dir))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out_dir.iterdir()}
    assert json.loads((out_dir / "tokenizer.json").read_text()) == json.loads((hf_dir / "tokenizer.json").read_text())
    exported, original = hf_model(out_dir), hf_model(hf_dir)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(exported(x).logits, original(x).logits)
    again = import_checkpoint(out_dir, tmp_path / "again.ckpt")  # the command itself: the `imported` fixture
    first, second = (torch.load(p, weights_only=True)["state_dict"] for p in (imported, again))
    assert first.keys() == second.keys()
    for key, value in first.items():
        assert torch.equal(value, second[key]), key


def test_a_safetensors_file_with_its_config_imports(hf_dir, imported, tmp_path):
    from {{cookiecutter.package}}.hf import import_checkpoint

    out = import_checkpoint(hf_dir / "model.safetensors", tmp_path / "from-file.ckpt")
    a, b = (torch.load(p, weights_only=True)["state_dict"] for p in (imported, out))
    assert all(torch.equal(v, b[k]) for k, v in a.items())


def broken_copy(hf_dir: Path, tmp_path: Path, **config_changes) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(hf_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type='llama'; only GPT-2 (model_type 'gpt2') converts to this GPT"),
        ({"activation_function": "relu"}, "activation_function='relu' cannot be converted"),
        ({"vocab_size": 299}, "tokenizer.json has 300 tokens but the model's vocab_size is 299"),
        ({"n_inner": 64}, "n_inner=64 cannot be converted"),
    ],
)
def test_what_cannot_be_converted_is_one_clear_error(hf_dir, tmp_path, change, message, capsys):
    out = tmp_path / "x.ckpt"
    stderr = cli_error(capsys, "import", str(broken_copy(hf_dir, tmp_path, **change)), str(out))
    assert stderr.startswith("error: SRC=") and message in stderr
    assert not out.exists() and not list(tmp_path.glob(".x.ckpt*"))  # nothing half-written


def test_missing_files_and_an_unexportable_checkpoint_are_clear_errors(hf_dir, tmp_path, gpt_checkpoint, capsys):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(hf_dir, folder)
    (folder / "tokenizer.json").unlink()
    assert f"no tokenizer.json in {folder}" in cli_error(capsys, "import", str(folder), str(tmp_path / "x.ckpt"))
    # The tiny preset has no biases (bias=false); GPT-2 has them everywhere.
    assert "trained with bias=false" in cli_error(capsys, "export", str(gpt_checkpoint), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def data_overrides(hf_dir: Path) -> list[str]:
    """The test corpus tokenized by the imported model's own tokenizer.json."""
    return [f"data.tokenizer.path={hf_dir / 'tokenizer.json'}", f"data.tokenizer.vocab_size={VOCAB}"]


def test_an_imported_model_fine_tunes_and_samples(compose_cfg, hf_dir, imported):
    from hydra.utils import instantiate

    overrides = ["model/net=pretrained", f"model.net.ckpt_path={imported}", *data_overrides(hf_dir), *QUIET]
    cfg = compose_cfg(overrides=overrides)
    module = instantiate(cfg.model, _convert_="all")
    module.configure_model()
    start = torch.load(imported, weights_only=True)["state_dict"]
    assert all(torch.equal(v, start[f"net.{k}"]) for k, v in module.net.state_dict().items())  # starts from the import
    metrics = train(cfg)
    assert metrics["val/loss"] < 10
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    tuned, _ = load_network_checkpoint(str(last))  # rebuilt from model.net.ckpt_path, then its own weights
    trained = torch.load(last, weights_only=True)["state_dict"]
    assert all(torch.equal(v, trained[f"net.{k}"]) for k, v in tuned.state_dict().items())
    assert any(not torch.equal(v, start[f"net.{k}"]) for k, v in tuned.state_dict().items())  # it did train
    # generate.py samples from the import with the folder's own tokenizer (stored in the checkpoint).
    proc = run_script(
        "generate.py", f"ckpt_path={imported}", "prompt=ROMEO:", "max_new_tokens=8", f"hydra.run.dir={last.parent}"
    )
    assert proc.stdout.startswith("ROMEO:") and len(proc.stdout.strip()) > len("ROMEO:")
{%- if cookiecutter.distill %}


@pytest.mark.parametrize("source", ["hf", "ckpt_path"])
def test_an_imported_model_teaches_model_distill(compose_cfg, hf_dir, imported, source):
    value = hf_dir if source == "hf" else imported
    cfg = compose_cfg(overrides=["model=distill", f"model.teacher.{source}={value}", *data_overrides(hf_dir), *QUIET])
    metrics = train(cfg)
    # The teacher's validation loss is transformers' loss on the same windows (random weights: high).
    assert metrics["val/teacher_loss"] > 0 and metrics["val/kl"] >= 0
{%- endif %}


def test_eval_of_an_import_reports_transformers_loss_on_the_validation_windows(compose_cfg, hf_dir, imported):
    from hydra.utils import instantiate

    from {{cookiecutter.package}}.training import evaluate

    cfg = compose_cfg("eval", [f"ckpt_path={imported}", *data_overrides(hf_dir)])
    metrics = evaluate(cfg)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("validate")
    theirs, total, n = hf_model(hf_dir), 0.0, 0
    with torch.no_grad():
        for x, y in datamodule.val_dataloader():
            logits = theirs(x).logits  # transformers' loss on the same windows, token-weighted
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            n += y.numel()
    assert metrics["val/loss"] == pytest.approx(total / n, rel=1e-5)
