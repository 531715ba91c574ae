"""The three dependency lists agree, the models/ notes exist, and the CI script parses."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]

MODEL_FOLDERS = [
    "stable_diffusion",
    "stable_diffusion_xl",
    "stable_diffusion_xl_turbo",
    "AnimateDiff",
    "ControlNet",
    "Annotators",
    "lora",
    "textual_inversion",
    "BeautifulPrompt",
    "translator",
    "RIFE",
]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_lines(text):
    return sorted(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def test_requirements_txt_matches_pyproject():
    runtime = sorted(_pyproject()["project"]["dependencies"])
    assert _requirement_lines((ROOT / "requirements.txt").read_text()) == runtime


def test_environment_yml_matches_pyproject():
    yaml = pytest.importorskip("yaml")
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["name"] == "DiffSynthStudio"
    assert "python=3.11" in env["dependencies"]
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert sorted(pip_section) == sorted(_pyproject()["project"]["dependencies"])
    assert not any("cupy" in dep for dep in pip_section)  # optional GPU extra only


def _specifiers(requirements, distribution):
    """The version specifiers (``>=4.40``, ``<5.6`` ...) of ``distribution`` in a requirement list."""
    (requirement,) = [r for r in requirements if re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() == distribution]
    return [s.strip() for s in requirement[len(distribution):].split(";")[0].split(",") if s.strip()]


def test_runtime_transformers_has_no_upper_bound():
    # The engine works with current transformers: a cap here would make pip downgrade a user's newer one.
    specifiers = _specifiers(_pyproject()["project"]["dependencies"], "transformers")
    assert ">=4.40" in specifiers
    upper = [s for s in specifiers if s.startswith(("<", "~=", "==", "==="))]
    assert not upper, f"runtime transformers requirement carries an upper bound {upper}; pin it in the test extra instead"


def test_test_extra_keeps_transformers_below_5_6_for_the_references():
    # transformers 5.6 flattened CLIPTextModel (no `.text_model`), which breaks the diffusers reference pipelines.
    project = _pyproject()["project"]
    assert "<5.6" in _specifiers(project["optional-dependencies"]["test"], "transformers")
    assert "diffusers==0.42.1" in project["optional-dependencies"]["test"]


def test_test_references_are_pinned_for_no_deps_install():
    lines = _requirement_lines((ROOT / "requirements-test-nodeps.txt").read_text())
    assert {line.split("==")[0] for line in lines} == {"open_clip_torch", "stable-diffusion-sdkit"}
    assert all("==" in line for line in lines)


def test_console_script_and_package_data():
    project = _pyproject()
    assert project["project"]["scripts"]["diffsynth"] == "diffsynth.cli:main"
    assert "prompts/data/*" in project["tool"]["setuptools"]["package-data"]["diffsynth"]


@pytest.mark.parametrize("folder", MODEL_FOLDERS)
def test_models_folder_has_a_note(folder):
    note = ROOT / "models" / folder / "README.md"
    assert note.is_file()
    assert "examples/" in note.read_text() or "WebUI" in note.read_text()


def test_ci_script_is_valid_bash_and_installs_cpu_torch_first():
    script = ROOT / ".ci" / "run"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "set -euo pipefail" in text
    torch_at = text.index("pip install torch==2.13.0")
    assert torch_at < text.index("pip install -e .")


# Import name -> distribution name, where they differ.
DISTRIBUTION_OF = {
    "cv2": "opencv-python-headless",
    "PIL": "pillow",
    "yaml": "pyyaml",
    "skimage": "scikit-image",
    "ldm": "stable-diffusion-sdkit",
    "imageio_ffmpeg": "imageio-ffmpeg",
}
# Imported only inside a function that explains how to install it when it is missing;
# tokenizers always comes with transformers (the test kit trains tiny tokenizers with it).
OPTIONAL_AT_RUNTIME = {"cupy", "yaml", "tokenizers"}


def _third_party_imports(folder):
    import ast

    names = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    local = {"diffsynth", "tests", "bench", "examples"}
    return {n for n in names if n not in sys.stdlib_module_names and n not in local}


def _distributions(requirements):
    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def test_every_package_import_is_a_declared_dependency():
    # CI installs from these lists on a fresh machine: an undeclared import breaks `diffsynth demo` there
    # even though it works on a developer's machine that happens to have the package.
    declared = _distributions(_pyproject()["project"]["dependencies"])
    missing = {
        name
        for name in _third_party_imports("diffsynth") - OPTIONAL_AT_RUNTIME
        if DISTRIBUTION_OF.get(name, name).lower() not in declared
    }
    assert not missing, f"imported by diffsynth/ but not in pyproject dependencies: {sorted(missing)}"


def test_every_test_import_is_installed_by_ci():
    project = _pyproject()["project"]
    declared = _distributions(project["dependencies"] + project["optional-dependencies"]["test"])
    declared |= _distributions(_requirement_lines((ROOT / "requirements-test-nodeps.txt").read_text()))
    missing = {
        name
        for name in _third_party_imports("tests") - {"cupy"}
        if DISTRIBUTION_OF.get(name, name).lower() not in declared
    }
    assert not missing, f"imported by tests/ but installed by no CI step: {sorted(missing)}"
