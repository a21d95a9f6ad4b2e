"""export.py: safetensors (weights + config.json) and ONNX (checked with onnxruntime) of the GPT."""

import json

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # torch.onnx.export(dynamo=True) translates through it
from safetensors import safe_open  # noqa: E402

from {{cookiecutter.package}}.export import export_onnx, export_safetensors, load_safetensors, onnx_max_error  # noqa: E402
from {{cookiecutter.package}}.models.gpt import GPT  # noqa: E402
from {{cookiecutter.package}}.networks import net_preset  # noqa: E402

from .conftest import run_script, tiny_gpt  # noqa: E402
from .test_quantize import trained  # noqa: F401  (a fixture: a tiny GPT checkpoint written by train.py)


def tiny() -> GPT:
    torch.manual_seed(0)
    return tiny_gpt(vocab_size=300).eval()


def test_safetensors_round_trip_gives_the_same_logits(tmp_path):
    model = tiny()
    written = export_safetensors(model, tmp_path, tokenizer_json='{"fake": "tokenizer"}')
    assert [p.name for p in written] == ["model.safetensors", "config.json", "tokenizer.json"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config == {
        "architecture": "GPT",
        "config": {k: v for k, v in net_preset("tiny", vocab_size=300, max_length=128).items() if k != "_target_"},
    }
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len({"tok_emb.weight", "lm_head.weight"} & keys) == 1  # the tied matrix is stored once
    loaded = load_safetensors(tmp_path)
    assert loaded.lm_head.weight is loaded.tok_emb.weight
    idx = torch.randint(0, 300, (2, 20))
    assert torch.equal(loaded(idx), model(idx))


@pytest.mark.slow
def test_onnx_logits_match_pytorch_within_1e4_for_any_batch_and_length(tmp_path):
    model = tiny()
    path = export_onnx(model, tmp_path / "model.onnx", opset=18)
    import onnx

    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["idx"] and [o.name for o in graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims), dims  # batch and sequence are dynamic axes
    assert onnx_max_error(model, path, [(1, 1), (2, 17), (3, 128)]) < 1e-4


@pytest.mark.slow
def test_export_py_writes_both_formats_and_refuses_bad_input(trained, tmp_path):  # noqa: F811
    ckpt, _ = trained
    proc = run_script("export.py", f"ckpt_path={ckpt}", f"output={tmp_path / 'st'}", f"hydra.run.dir={tmp_path / 'h'}")
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert load_safetensors(tmp_path / "st").config.vocab_size == 512
    proc = run_script("export.py", f"ckpt_path={ckpt}", "export.format=onnx", f"output={tmp_path / 'onnx'}",
                      f"hydra.run.dir={tmp_path / 'h'}")  # fmt: skip
    assert "onnxruntime vs PyTorch: max |logit difference|" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == ["model.onnx", "tokenizer.json"]
    exists = f"error: output={str(tmp_path / 'st')!r} already exists; remove it or choose another output=\n"
    for overrides, message in [
        (["export.format=tflite"], "error: export.format='tflite': expected one of ['safetensors', 'onnx']\n"),
        ([f"output={tmp_path / 'st'}"], exists),
    ]:
        proc = run_script("export.py", f"ckpt_path={ckpt}", *overrides, f"hydra.run.dir={tmp_path / 'h'}", check=False)
        assert proc.returncode == 2 and proc.stderr.endswith(message), proc.stderr
