"""pyproject.toml and scripts/install.sh: the package installs, its commands run, the GPU route is well formed.

The installs go into fresh venvs made from this interpreter that see the test venv's packages through a
``.pth`` line (torch, transformers: nothing heavy is downloaded), from a copy of the project (an in-tree
build leaves ``build/`` behind). The GPU route cannot run here (no GPU, gigabytes of CUDA wheels): its
``--dry-run`` shows the commands it would run, checked against the requirement files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.conftest import PYTHON, REPO_ROOT

COMMANDS = {  # command -> the start of its usage line
    "qwenvl-train": "usage: train_qwen.py",
    "qwenvl-pack": "usage: ",
    "qwenvl-check": "usage: ",
    "qwenvl-infer": "usage: ",
    "qwenvl-merge": "usage: ",
    "qwenvl-plot-loss": "usage: plot_loss.py",
}
if (REPO_ROOT / "tools" / "preview.py").is_file():
    COMMANDS["qwenvl-preview"] = "usage: "
PROJECT_FILES = ["pyproject.toml", "README.md", "requirements.txt", "requirements-dev.txt", "requirements-gpu.txt",
                 "qwenvl", "tools"]


def clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH: what is imported must come from the venv's install."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def copy_project(target: Path) -> Path:
    """The files a build reads, copied to ``target`` (no caches, no .venv)."""
    target.mkdir()
    for name in PROJECT_FILES:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / name)
    return target


def fresh_venv(path: Path) -> Path:
    """A venv without pip whose imports fall back to this interpreter's site-packages; its python."""
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "_test_parent_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def pip_into(python: Path, *args: str) -> subprocess.CompletedProcess:
    """This interpreter's pip, installing into the venv of ``python`` (no build isolation: no download)."""
    done = subprocess.run([PYTHON, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                           "--no-build-isolation", *args], capture_output=True, text=True, timeout=120, env=clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def where(python: Path, cwd: Path) -> dict[str, str]:
    """Files the venv imports ``qwenvl`` and ``tools.commands`` from (run outside the checkout)."""
    code = "import qwenvl, tools.commands; print(qwenvl.__file__); print(tools.commands.__file__)"
    out = subprocess.run([str(python), "-c", code], cwd=cwd, env=clean_env(), capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    return {"qwenvl": out[0], "tools": out[1]}


@pytest.mark.slow
def test_pip_install_gives_the_package_and_every_command(tmp_path):
    source = copy_project(tmp_path / "project")
    python = fresh_venv(tmp_path / "venv")
    pip_into(python, str(source))
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # every module of the checkout's packages is in the install (a new subpackage is found, not listed)
    shipped = {p.relative_to(source).as_posix() for name in ("qwenvl", "tools") for p in (source / name).rglob("*.py")}
    installed = {p.relative_to(purelib).as_posix() for name in ("qwenvl", "tools") for p in (purelib / name).rglob("*.py")}
    assert shipped == installed and "qwenvl/train/plots.py" in installed
    assert where(python, tmp_path) == {"qwenvl": str(purelib / "qwenvl" / "__init__.py"),
                                       "tools": str(purelib / "tools" / "commands.py")}

    # each command's --help, all at once (each imports torch and transformers: seconds apiece)
    bin_dir = python.parent
    running = {name: subprocess.Popen([str(bin_dir / name), "--help"], cwd=tmp_path, env=clean_env(),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name in COMMANDS}
    for name, process in running.items():
        out, err = process.communicate(timeout=180)
        assert process.returncode == 0, (name, err[-2000:])
        assert re.search(f"^{COMMANDS[name]}", out, re.MULTILINE), (name, out[:300])
        if name == "qwenvl-train":
            assert "--model_name_or_path" in out and "--dataset_use" in out


@pytest.mark.slow
def test_editable_install_runs_the_checkout_files(tmp_path):
    source = copy_project(tmp_path / "project")
    python = fresh_venv(tmp_path / "venv")
    pip_into(python, "-e", str(source))
    assert where(python, tmp_path) == {"qwenvl": str(source / "qwenvl" / "__init__.py"),
                                       "tools": str(source / "tools" / "commands.py")}
    done = subprocess.run([str(python.parent / "qwenvl-plot-loss"), str(tmp_path / "missing")], cwd=tmp_path,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "missing: no such folder" in done.stderr, done.stderr[-2000:]


def test_installed_torch_meets_the_package_dependencies(tmp_path):
    """`pip install .` over an environment with the CPU torch resolves nothing again (no CUDA torch pulled)."""
    source = copy_project(tmp_path / "project")
    report = tmp_path / "report.json"
    done = subprocess.run([PYTHON, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "-q", "--report",
                           str(report), str(source)], capture_output=True, text=True, timeout=120, env=clean_env())
    assert done.returncode == 0, done.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    assert [item["metadata"]["name"] for item in installs] == ["qwenvl"]
    requires = [Requirement(r) for r in installs[0]["metadata"]["requires_dist"]]
    torch = next(r for r in requires if r.name == "torch")
    assert torch.specifier.contains("2.13.0+cpu") and not torch.specifier.contains("2.14.0")
    assert {r.name for r in requires if r.marker is None} >= {"transformers", "matplotlib", "peft", "deepspeed"}


def install_sh(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """scripts/install.sh run from a copy of the project in ``tmp_path`` (so nothing lands in the checkout)."""
    project = tmp_path / "project"
    if not project.exists():
        (project / "scripts").mkdir(parents=True)
        shutil.copy2(REPO_ROOT / "scripts" / "install.sh", project / "scripts" / "install.sh")
    return subprocess.run(["bash", "scripts/install.sh", *args], cwd=project, capture_output=True, text=True,
                          timeout=60, env=clean_env() | {"PYTHON": sys.executable} | env)


def test_install_sh_help_and_refused_options(tmp_path):
    done = install_sh(tmp_path, "--help")
    assert done.returncode == 0 and done.stdout.startswith("Usage: bash scripts/install.sh [--gpu")
    assert "--no-flash-attn" in done.stdout and "TORCH_INDEX_URL" in done.stdout
    done = install_sh(tmp_path, "--cuda")
    assert done.returncode == 2
    assert done.stderr.strip() == ("install.sh: error: unknown option --cuda (expected --gpu, --no-flash-attn, "
                                   "--dry-run or --help)")
    done = install_sh(tmp_path, "--no-flash-attn")
    assert done.returncode == 2 and "--no-flash-attn only applies with --gpu" in done.stderr
    assert not (tmp_path / "project" / ".venv").exists()  # refused before anything ran


def commands_of(done: subprocess.CompletedProcess) -> list[list[str]]:
    """The ``+ cmd args`` lines of a --dry-run, shell-unquoted."""
    assert done.returncode == 0, done.stderr
    lines = [line[2:] for line in done.stdout.splitlines() if line.startswith("+ ")]
    return [subprocess.run(["bash", "-c", f'printf "%s\\n" {line}'], capture_output=True, text=True,
                           check=True).stdout.splitlines() for line in lines]


def requirement_file(name: str) -> dict[str, Requirement]:
    lines = (REPO_ROOT / name).read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return {r.name: r for r in reqs}


def test_install_sh_routes(tmp_path):
    venv_python = ".venv/bin/python"
    cpu = commands_of(install_sh(tmp_path, "--dry-run"))
    assert cpu[0] == [sys.executable, "-m", "venv", ".venv"]
    installs = [c[c.index("install") + 1:] for c in cpu if c[:1] == [venv_python] and "install" in c]
    assert installs == [["-q", "--upgrade", "pip"], ["-q", "torch==2.13.0"],
                        ["-q", "-r", "requirements.txt", "-r", "requirements-dev.txt"], ["-q", "setuptools>=77"],
                        ["-q", "--no-deps", "--no-build-isolation", "-e", "."]]

    gpu = commands_of(install_sh(tmp_path, "--gpu", "--dry-run", TORCH_INDEX_URL="file:///wheels/cu128"))
    flat = [" ".join(c) for c in gpu]
    torch_line = next(i for i, c in enumerate(flat) if "torch==2.13.0" in c)
    assert "--index-url file:///wheels/cu128 torch==2.13.0 torchvision>=0.28,<0.29" in flat[torch_line]
    requirements_line = flat.index(f"{venv_python} -m pip install -q -r requirements.txt -r requirements-dev.txt")
    gpu_line = flat.index(f"{venv_python} -m pip install -q -r requirements-gpu.txt")
    flash = flat.index(f"{venv_python} -m pip install --no-build-isolation flash-attn>=2.8.3,<2.9")
    build_tools = next(i for i, c in enumerate(flat) if "ninja>=1.11,<1.14" in c)
    assert torch_line < requirements_line < gpu_line < build_tools < flash < len(flat) - 1
    assert flat[-1].endswith("-m pip install -q --no-deps --no-build-isolation -e .")

    without_flash = " ".join(" ".join(c) for c in commands_of(install_sh(tmp_path, "--gpu", "--no-flash-attn",
                                                                         "--dry-run")))
    assert "flash-attn" not in without_flash and "requirements-gpu.txt" in without_flash
    assert "--index-url" not in without_flash

    # the script's pins agree with the requirement files
    torch = requirement_file("requirements.txt")["torch"]
    assert torch.specifier.contains("2.13.0")
    gpu_requirements = requirement_file("requirements-gpu.txt")
    assert str(gpu_requirements["torchvision"].specifier) == str(Requirement("torchvision>=0.28,<0.29").specifier)
    assert gpu_requirements["torchvision"].specifier.contains(Version("0.28.0"))
    assert set(gpu_requirements) == {"torchvision", "liger-kernel", "bitsandbytes"}


def test_readme_install_section_names_the_extras():
    readme = (REPO_ROOT / "README.md").read_text()
    section = re.search(r"^## Install\n(.*?)(?=^## )", readme, re.MULTILINE | re.DOTALL)
    assert section, "README has no '## Install' section"
    text = section.group(1)
    for needed in ("torchvision", "AutoProcessor", "flash-attn", "flash_attention_2", "liger-kernel",
                   "--use_liger_kernel", "bitsandbytes", "--load_in_4bit", "pip install -e .",
                   "scripts/install.sh --gpu", *COMMANDS):
        assert needed in text, needed
