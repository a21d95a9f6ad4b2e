"""Baking: the file set of every module combination, rendering, lint, validation of answers, git."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import COMBINATIONS, TEMPLATE, baked_files, combo_id, run

# The files each optional module owns, written out here independently of hooks/post_gen_project.py:
# a project baked without the module must have exactly the default project's files minus these.
# `{pkg}` is the package folder.
MODULE_OWNED = {
    "gpt": [
        "{pkg}/models/gpt.py",
        "{pkg}/modules/gpt.py",
        "{pkg}/data/text.py",
        "{pkg}/generation.py",
        "{pkg}/api.py",
        "{pkg}/serve/generate.py",
        "{pkg}/callbacks/samples.py",
        "configs/model/gpt.yaml",
        "configs/model/net/tiny.yaml",
        "configs/model/net/gpt2-124m.yaml",
        "configs/model/net/gpt2-350m.yaml",
        "configs/model/net/gpt2-774m.yaml",
        "configs/model/net/gpt2-1.5b.yaml",
        "configs/model/net/pretrained.yaml",
        "{pkg}/hf.py",
        "tests/test_hf.py",
        "tests/test_recipe.py",
        "tests/test_docs_inference.py",
        "tests/test_networks.py",
        "configs/data/shakespeare.yaml",
        "configs/data/text.yaml",
        "configs/experiment/demo.yaml",
        "configs/generate.yaml",
        "generate.py",
        "benchmarks/gpt_step.py",
        "benchmarks/fsdp_step.py",
        "benchmarks/scaling.py",
        "tests/test_scaling_benchmark.py",
        "tests/test_gpt_model.py",
        "tests/test_text_data.py",
        "tests/test_gpt_training.py",
        "tests/test_generation_options.py",
        "tests/test_slurm.py",
        "tests/test_serve_gpt.py",
        "benchmarks/decode.py",
        "{pkg}/export.py",
        "export.py",
        "configs/export.yaml",
        "tests/test_decoding.py",
        "tests/test_quantize.py",
        "tests/test_export.py",
        "docs/gpt.md",
        "docs/inference.md",
    ],
    "distill": [
        "{pkg}/losses/distill.py",
        "{pkg}/modules/distill.py",
        "configs/model/distill.yaml",
        "configs/experiment/distill_shakespeare_teacher.yaml",
        "configs/experiment/distill_shakespeare.yaml",
        "benchmarks/distill_step.py",
        "tests/test_distill_loss.py",
        "tests/test_distill.py",
        "docs/distill.md",
    ],
    "clip": [
        "{pkg}/models/clip.py",
        "{pkg}/losses/contrastive.py",
        "{pkg}/modules/clip.py",
        "{pkg}/data/image_text.py",
        "{pkg}/data/shapes.py",
        "{pkg}/callbacks/similarity.py",
        "{pkg}/pipeline.py",
        "{pkg}/serve/embed.py",
        "configs/model/clip.yaml",
        "configs/model/clip_net/shapes.yaml",
        "configs/model/clip_net/tiny.yaml",
        "configs/model/clip_net/vit-b-16.yaml",
        "configs/data/image_text.yaml",
        "configs/data/shapes.yaml",
        "configs/experiment/clip_shapes.yaml",
        "benchmarks/clip_step.py",
        "tests/test_clip_model.py",
        "tests/test_contrastive.py",
        "tests/test_image_text_data.py",
        "tests/test_clip_training.py",
        "docs/clip.md",
        "tests/test_serve_clip.py",
    ],
}
DEFAULT_FILES = (Path(__file__).parent / "baked_files.txt").read_text().split()


def owned(module: str, package: str = "my_paper") -> set[str]:
    return {p.format(pkg=f"src/{package}") for p in MODULE_OWNED[module]}


def test_default_bake_has_exactly_the_listed_files(bake):
    root = bake()
    assert root.name == "my-paper"
    assert sorted(baked_files(root)) == DEFAULT_FILES


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_each_combination_drops_exactly_the_unchosen_modules(bake, combo):
    gpt, distill, clip = combo
    root = bake(gpt=gpt, distill=distill, clip=clip)
    expected = set(DEFAULT_FILES)
    for module, chosen in zip(("gpt", "distill", "clip"), combo):
        if not chosen:
            expected -= owned(module)
    assert baked_files(root) == expected
    answers = json.loads((root / ".cookiecutter.json").read_text())
    assert (answers["gpt"], answers["distill"], answers["clip"]) == combo


@pytest.mark.parametrize("combo", COMBINATIONS, ids=combo_id)
def test_no_unrendered_jinja_and_ruff_clean(bake, combo):
    root = bake(gpt=combo[0], distill=combo[1], clip=combo[2])
    for rel in baked_files(root):
        text = (root / rel).read_text(errors="replace")
        assert not re.search(r"\{\{-?\s*cookiecutter|\{%-?\s|\bcookiecutter\.(?!json)", text), rel
    ruff = [sys.executable, "-m", "ruff"]
    lint = run([*ruff, "check", "."], root)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run([*ruff, "format", "--check", "."], root)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_names_and_license_are_rendered(bake):
    root = bake(project_name="Sparse Attention Study", author="Ada L", license="Apache-2.0")
    assert root.name == "sparse-attention-study"
    assert (root / "src" / "sparse_attention_study" / "__init__.py").is_file()
    assert "Apache License" in (root / "LICENSE").read_text()
    assert "Ada L" in (root / "LICENSE").read_text()
    pyproject = (root / "pyproject.toml").read_text()
    assert 'name = "sparse-attention-study"' in pyproject and 'license = "Apache-2.0"' in pyproject
    assert not (bake(project_name="No License", license="none") / "LICENSE").exists()


@pytest.mark.parametrize(
    "answers, message",
    [
        ({"project": "My Paper"}, "project 'My Paper': use lowercase letters"),
        ({"project": "paper-", "package": "paper"}, "project 'paper-'"),
        ({"package": "my-paper"}, "package 'my-paper': must be a lowercase Python identifier"),
        ({"package": "class"}, "package 'class'"),
        ({"package": "torch"}, "package 'torch' would shadow"),
        ({"package": "json"}, "package 'json' would shadow"),
        ({"python_version": "2.7"}, "python_version '2.7'"),
        ({"gpt": False, "distill": True}, "distill needs gpt"),
        ({"gpt": False, "distill": False, "clip": False}, "choose at least one module"),
    ],
)
def test_invalid_answers_are_rejected_with_one_clear_message(cookies, capfd, answers, message):
    result = cookies.bake(extra_context={"git_init": False, **answers})
    assert result.exit_code != 0
    assert message in capfd.readouterr().err
    assert result.project_path is None or not Path(result.project_path).exists()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_init_commits_everything(cookies):
    result = cookies.bake(extra_context={"git_init": True, "author": "Ada L", "email": "ada@example.org"})
    assert result.exit_code == 0, result.exception
    root = Path(result.project_path)
    log = run(["git", "log", "--format=%an <%ae>|%s"], root)
    assert log.stdout.strip() == "Ada L <ada@example.org>|Initial commit from deepseek-template"
    assert run(["git", "status", "--porcelain"], root).stdout == ""
    tracked = set(run(["git", "ls-files"], root).stdout.split())
    assert tracked == baked_files(root)


def test_template_files_are_all_reachable():
    """Every file under the project template is baked by default (nothing dead in the template)."""
    template_root = TEMPLATE / "{{cookiecutter.project}}"
    n_template = sum(1 for p in template_root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert n_template == len(DEFAULT_FILES) - 1  # the hook adds .cookiecutter.json


@pytest.mark.parametrize(
    "answer, message",
    [
        (
            "project=Bad!Name",
            (
                "project 'Bad!Name': use lowercase letters, digits and single hyphens, starting with a letter "
                "(e.g. 'my-paper')"
            ),
        ),
        ("package=torch", "package 'torch' would shadow the library of that name; choose another"),
    ],
)
def test_a_bad_answer_stops_the_cookiecutter_command_with_its_message_last_and_alone(tmp_path, answer, message):
    """The real command line: the message is the only output, exit status 2, nothing written."""
    cookiecutter = Path(sys.executable).with_name("cookiecutter")
    out = tmp_path / "out"
    proc = run([str(cookiecutter), "--no-input", "-o", str(out), str(TEMPLATE), answer, "git_init=no"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [f"deepseek-template: cannot bake this project: {message}"]
    assert not out.exists() or not any(out.iterdir())


def test_each_answer_is_checked_before_the_next_question(tmp_path):
    """Interactively, a bad folder name stops the bake right after it is typed: the package question
    (the next one) is never asked."""
    cookiecutter = Path(sys.executable).with_name("cookiecutter")
    answers = "My Paper\nBad!Name\nmy_paper\n" + "\n" * 12
    proc = subprocess.run(
        [str(cookiecutter), "-o", str(tmp_path / "out"), str(TEMPLATE)],
        input=answers,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Folder and distribution name" in proc.stdout and "Python import name" not in proc.stdout
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("deepseek-template: cannot bake this project: project 'Bad!Name'")
    )


def test_the_template_docs_show_only_sweeps_the_baked_project_runs(bake):
    """A sweep in this README or docs/ must be one the baked project's README or docs show too: its
    tests/test_docs_sweeps.py runs each of those exactly as written."""
    root = bake()
    baked = "\n".join(p.read_text() for p in [root / "README.md", *(root / "docs").glob("*.md")])
    shown = re.findall(
        r"python train\.py -m [^`#\n]*",
        "\n".join(p.read_text() for p in [TEMPLATE / "README.md", *(TEMPLATE / "docs").glob("*.md")]),
    )
    assert shown
    for command in shown:
        assert command.strip() in baked, command
