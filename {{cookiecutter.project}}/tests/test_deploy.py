"""deploy/: the Dockerfile, the Kubernetes manifests and the Grafana dashboard, checked without
docker or a cluster (docs/deploy.md says why the image is not built here), and the server's
one-line startup errors, which need no model."""

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from {{cookiecutter.package}}.serve.metrics import Metrics

from .conftest import CONFIGS, ROOT, run_script

DEPLOY = ROOT / "deploy"
PROJECT = "{{ cookiecutter.project }}"


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def serve_config(overrides: list[str]) -> DictConfig:
    """configs/serve.yaml composed with a container's arguments: a key that does not exist fails here."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose("serve", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def test_dockerfile_follows_the_rules():
    steps = dockerfile()
    names = [name for name, _ in steps]
    args = dict(reversed(steps))  # the first occurrence of each instruction
    # A pinned CUDA runtime base, one stage (hadolint DL3006/DL3007: no untagged or latest base).
    assert names.count("FROM") == 1 and names[0] == "FROM"
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", args["FROM"]), args["FROM"]
    # Runs as a user created in the image, not root (DL3002), and nothing runs as root after it.
    users = [i for i, name in enumerate(names) if name == "USER"]
    assert users and steps[users[-1]][1] not in ("root", "0")
    assert max(i for i, name in enumerate(names) if name == "RUN") < users[-1]
    assert f"useradd --create-home --uid 10001 --shell /usr/sbin/nologin {steps[users[-1]][1]}" in args["RUN"]
    for name, arg in steps:
        assert name != "ADD", "COPY local files (DL3020)"
        if name == "RUN" and "apt-get install" in arg:  # DL3009, DL3015, one layer with its update
            assert "apt-get update" in arg and "--no-install-recommends" in arg and "rm -rf /var/lib/apt/lists/*" in arg
        if name == "RUN" and "pip install" in arg:
            assert "PIP_NO_CACHE_DIR=1" in args["ENV"] or "--no-cache-dir" in arg  # DL3042
        if name == "COPY":
            for source in shlex.split(arg)[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: not in the project"
    assert 'pip install ".[serve]"' in [arg for name, arg in steps if name == "RUN"]
    assert "serve" in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # Exec form (DL3025): signals reach serve.py. It listens on every interface, on the exposed port.
    entrypoint, command = json.loads(args["ENTRYPOINT"]), json.loads(args["CMD"])
    assert entrypoint[:2] == ["python", "serve.py"]
    cfg = serve_config(entrypoint[2:] + command)
    assert cfg.server.host == "0.0.0.0" and str(cfg.server.port) == args["EXPOSE"]
    assert cfg.ckpt_path.startswith("/models/")
    # The HEALTHCHECK asks /health on that port, with a timeout, in exec form.
    options, _, probe = args["HEALTHCHECK"].partition("CMD")
    assert "--timeout=" in options and "--start-period=" in options
    assert f"http://127.0.0.1:{cfg.server.port}/health" in " ".join(json.loads(probe))
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert {"logs/", "data/", ".venv/", "**/*.ckpt"} <= set(ignored)


def test_kubernetes_manifests_have_the_gpu_probes_service_and_scrape_annotations():
    docs = list(yaml.safe_load_all((DEPLOY / "k8s.yaml").read_text()))
    for doc in docs:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc) and doc["metadata"]["name"]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert sorted(by_kind) == ["Deployment", "Service"]
    deployment, service = by_kind["Deployment"], by_kind["Service"]
    assert deployment["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    [container] = pod["spec"]["containers"]
    assert container["image"].split(":")[0] == f"{PROJECT}-serve"  # the tag docs/deploy.md builds
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and ports.get(get["port"], get["port"]) == 8000, probe
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics" and int(annotations["prometheus.io/port"]) == 8000
    assert ports.get(service["spec"]["ports"][0]["targetPort"]) == 8000
    # The image's entrypoint arguments plus the manifest's make a valid serve.py command line.
    entrypoint = json.loads(dict(dockerfile())["ENTRYPOINT"])
    cfg = serve_config(entrypoint[2:] + container["args"])
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(cfg.ckpt_path.startswith(m + "/") for m in mounts)
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001  # the Dockerfile's user


def exported_metric_names() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}[family.type]
        names |= {family.name + suffix for suffix in suffixes}
    return names


def test_grafana_dashboard_queries_exactly_the_exported_metrics():
    dashboard = json.loads((DEPLOY / "grafana.json").read_text())
    assert dashboard["templating"]["list"][0] == {**dashboard["templating"]["list"][0], "type": "datasource"}
    expressions = []
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["datasource"]["uid"] == "${datasource}"
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        expressions += [target["expr"] for target in panel["targets"]]
    queried = {name for expr in expressions for name in re.findall(r"\bserve_[a-z_]+", expr)}
    exported = exported_metric_names()
    assert queried <= exported, f"the dashboard queries metrics the server does not export: {queried - exported}"
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in exported}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in queried}
    assert families == shown, f"metrics without a panel: {families - shown}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: d / "missing.ckpt", "does not exist (expected a .ckpt written by train.py)"),
        (lambda d: d, "is a sharded checkpoint folder; consolidate it into one file first"),
        (lambda d: _write(d / "junk.ckpt", b"not a checkpoint"), "cannot be read as a PyTorch checkpoint"),
        (lambda d: _save(d / "empty.ckpt", {"state_dict": {}}), "holds no network (expected a .ckpt written by"),
    ],
    ids=["missing", "folder", "junk", "no-network"],
)
def test_a_checkpoint_that_cannot_be_served_stops_with_one_line(tmp_path, make, expected):
    ckpt = make(tmp_path)
    proc = run_script("serve.py", f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == proc.stderr.strip().splitlines()[0]  # one line
    assert proc.stderr.startswith(f"error: ckpt_path='{ckpt}' ") and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _save(path: Path, obj: dict) -> Path:
    torch.save(obj, path)
    return path
