"""Remove what the user did not choose, record the answers, and optionally make a git repository."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

CONTEXT = json.loads(r'{{ cookiecutter | tojson }}')
PACKAGE = CONTEXT["package"]
PKG = f"src/{PACKAGE}"

# The files and folders that belong to each optional module, relative to the project root. Anything
# not listed here is shared and always baked. A listed path that is missing is a template bug.
MODULE_FILES = {
    "gpt": [
        f"{PKG}/models/gpt.py",
        f"{PKG}/modules/gpt.py",
        f"{PKG}/data/text.py",
        f"{PKG}/generation.py",
        f"{PKG}/api.py",
        f"{PKG}/serve/generate.py",
        f"{PKG}/callbacks/samples.py",
        f"{PKG}/hf.py",
        "configs/model/gpt.yaml",
        "configs/model/net",
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
        f"{PKG}/export.py",
        "export.py",
        "configs/export.yaml",
        "tests/test_decoding.py",
        "tests/test_quantize.py",
        "tests/test_export.py",
        "tests/test_hf.py",
        "tests/test_recipe.py",
        "tests/test_docs_inference.py",
        "tests/test_networks.py",
        "docs/gpt.md",
        "docs/inference.md",
    ],
    "distill": [
        f"{PKG}/losses/distill.py",
        f"{PKG}/modules/distill.py",
        "configs/model/distill.yaml",
        "configs/experiment/distill_shakespeare_teacher.yaml",
        "configs/experiment/distill_shakespeare.yaml",
        "benchmarks/distill_step.py",
        "tests/test_distill_loss.py",
        "tests/test_distill.py",
        "docs/distill.md",
    ],
    "clip": [
        f"{PKG}/models/clip.py",
        f"{PKG}/losses/contrastive.py",
        f"{PKG}/modules/clip.py",
        f"{PKG}/data/image_text.py",
        f"{PKG}/data/shapes.py",
        f"{PKG}/callbacks/similarity.py",
        f"{PKG}/pipeline.py",
        f"{PKG}/serve/embed.py",
        "configs/model/clip.yaml",
        "configs/model/clip_net",
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


def remove_unchosen(root: Path) -> None:
    emptied: set[Path] = set()
    for module, paths in MODULE_FILES.items():
        if CONTEXT[module]:
            continue
        for rel in paths:
            path = root / rel
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                sys.exit(f"deepseek-template bug: the {module!r} module lists {rel}, which was not baked")
            emptied.add(path.parent)
    # A folder that held only an unchosen module's files (e.g. benchmarks/) goes too.
    for folder in sorted(emptied, key=lambda p: len(p.parts), reverse=True):
        if folder != root and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def record_answers(root: Path) -> None:
    """`.cookiecutter.json`: the answers, to re-bake or update the project from the template later."""
    answers = {k: v for k, v in CONTEXT.items() if not k.startswith("_") or k == "_template"}
    (root / ".cookiecutter.json").write_text(json.dumps(answers, indent=2, sort_keys=True) + "\n")


def git_init(root: Path) -> None:
    if shutil.which("git") is None:
        print("deepseek-template: git not found; the project was baked without a repository", file=sys.stderr)
        return
    identity = ["-c", f"user.name={CONTEXT['author']}", "-c", f"user.email={CONTEXT['email']}"]
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", *identity, "commit", "-q", "-m", "Initial commit from deepseek-template"],
    ):
        subprocess.run(cmd, cwd=root, check=True)


if __name__ == "__main__":
    root = Path.cwd()
    remove_unchosen(root)
    if CONTEXT["license"] == "none":
        (root / "LICENSE").unlink()
    record_answers(root)
    if CONTEXT["git_init"]:
        git_init(root)
