"""The pack as the Comfy registry sees it: pyproject fields, `comfy node validate`, `comfy node pack`."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
COMFY = [sys.executable, "-m", "comfy_cli", "--skip-prompt", "--no-enable-telemetry"]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def comfy(*args, cwd):
    return subprocess.run([*COMFY, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_registry_fields():
    project, tool = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert project["name"] == "mimir-video" and re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["description"] and project["license"] and project["urls"]["Repository"].startswith("https://")
    assert tool["PublisherId"] and tool["DisplayName"] == "Mimir Video" and tool["Icon"].startswith("https://")
    assert tool["requires-comfyui"].startswith(">=")


def test_requirements_txt_mirrors_pyproject_without_torch():
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("#")]
    expected = [d for d in PYPROJECT["project"]["dependencies"] if not d.startswith("torch")]
    assert requirements == expected


def test_comfy_node_validate_passes():
    assert shutil.which("ruff") or subprocess.run([sys.executable, "-m", "ruff", "--version"]).returncode == 0
    result = comfy("node", "validate", cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr  # rich prints to either, depending on the terminal
    assert "All validation checks passed" in output and "Security warnings" not in output


def test_comfy_node_pack_leaves_tests_and_benchmarks_out(tmp_path):
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.fail("the repository has no commit to pack")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    result = comfy("node", "pack", cwd=clone)
    assert result.returncode == 0, result.stdout + result.stderr
    names = zipfile.ZipFile(clone / "node.zip").namelist()
    assert "__init__.py" in names and "nodes/sampling.py" in names and "mimir/pipeline.py" in names
    assert any(n.startswith("workflows/") for n in names)
    assert not [n for n in names if n.split("/")[0] in ("tests", "bench", ".ci")]
    bundled = [n for n in (ROOT / "mimir/demo/model").rglob("*") if n.is_file()] if (ROOT / "mimir/demo/model").is_dir() else []
    assert all(str(p.relative_to(ROOT)) in names for p in bundled)  # the demo model ships with the pack
