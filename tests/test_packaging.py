"""``pip install`` of the wheel gives a working tool.

The wheel is built from the sources (build isolation: the declared build backend) and installed
with its declared dependencies into a fresh virtual environment -- nothing from the test's own
environment -- where a synthetic checkpoint is converted with the ``mapper`` command and the HF
folder generates text with transformers, offline, with no warning on stderr (torch prints
"Failed to initialize NumPy" when numpy is missing); the libraries imported only for some
tokenizer types (sentencepiece, protobuf, tiktoken) import there too. torch is installed first, pinned, as the
README says (a plain ``torch`` requirement can resolve to a multi-GB CUDA build). About a minute
(45 s on an idle 2-core machine), most of it unpacking torch; pip's cache is reused.

A second, fast test checks statically that every library the package imports is declared.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = "neox-mapper"
TORCH = "torch==2.13.0"  # the Makefile's pin
SOURCES = ["pyproject.toml", "setup.py", "README.md", "mapper", "rules", "schemas"]
LONG = 1800  # seconds; a deadline for a hung pip, never reached on a loaded machine


def declared_dependencies() -> dict[str, str]:
    """Normalised distribution name -> requirement, from pyproject's ``dependencies``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {normalise(re.split(r"[<>=!~;\[ ]", item, maxsplit=1)[0]): item for item in project["dependencies"]}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def run(args: list[str | Path], *, env: dict[str, str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True, text=True, timeout=LONG)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if re.search(r"warn|numpy|traceback|error|deprecat", line, re.IGNORECASE)]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh venv with torch, then the wheel and its declared dependencies; its environment."""
    base = tmp_path_factory.mktemp("packaging")
    source = base / "source"  # a copy, so building leaves no build/ or egg-info in the checkout
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "_data"))
        else:
            shutil.copy2(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", MAPPER_CACHE_DIR=str(base / "cache"), PYTHONNOUSERSITE="1")
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", base / "dist", source], env=env, cwd=base)
    (wheel,) = (base / "dist").glob("*.whl")
    assert wheel.name.startswith(normalise(DISTRIBUTION).replace("-", "_") + "-")

    venv = base / "venv"
    run([sys.executable, "-m", "venv", venv], env=env, cwd=base)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    python = venv / "bin" / "python"
    # --no-compile: byte-compiling all of torch costs more than the modules a run imports
    run([python, "-m", "pip", "install", "--quiet", "--no-compile", TORCH], env=env, cwd=base)
    run([python, "-m", "pip", "install", "--quiet", "--no-compile", wheel], env=env, cwd=base)
    return venv, env


def test_the_installed_wheel_converts_and_the_hf_folder_generates_text(installed, tmp_path):
    venv, env = installed
    python, mapper = venv / "bin" / "python", venv / "bin" / "mapper"

    synthesise = ("from pathlib import Path\n"
                  "import mapper\n"
                  "from mapper.testing import synthesize_variant, write_neox_checkpoint\n"
                  "config, tensors = synthesize_variant('te-full-fp8', tp=2, seed=0)\n"
                  "write_neox_checkpoint(tensors, config, Path('neox'), tokenizer=True)\n"
                  "print(mapper.__file__)\n")
    done = run([python, "-c", synthesise], env=env, cwd=tmp_path)
    assert done.stdout.startswith(str(venv)), done.stdout  # the installed copy, not the checkout
    assert not warnings_in(done.stderr), done.stderr

    done = run([mapper, "convert", "neox", "hf"], env=env, cwd=tmp_path)
    assert "wrote" in done.stdout and not warnings_in(done.stderr), done.stderr
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= {p.name for p in (tmp_path / "hf").iterdir()}

    generate = ("import tokenizers, sentencepiece, google.protobuf, tiktoken.load, transformers.convert_slow_tokenizer\n"
                "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline\n"
                "tokenizer = AutoTokenizer.from_pretrained('hf', local_files_only=True)\n"
                "model = AutoModelForCausalLM.from_pretrained('hf', local_files_only=True)\n"
                "out = pipeline('text-generation', model=model, tokenizer=tokenizer)('hello', max_new_tokens=4, do_sample=False)\n"
                "print(len(tokenizer(out[0]['generated_text'])['input_ids']) - len(tokenizer('hello')['input_ids']))\n")
    done = run([python, "-c", generate], env=env, cwd=tmp_path)
    assert int(done.stdout.split()[-1]) > 0 and not warnings_in(done.stderr), done.stderr


def test_the_installed_command_answers_help_and_version_and_finds_its_rules(installed, tmp_path):
    venv, env = installed
    mapper = venv / "bin" / "mapper"
    done = run([mapper, "--help"], env=env, cwd=tmp_path)
    assert "convert" in done.stdout and done.stderr == ""
    done = run([mapper, "--version"], env=env, cwd=tmp_path)
    from mapper import __version__

    assert done.stdout.strip() == f"mapper {__version__}" and done.stderr == ""

    listed = json.loads(run([mapper, "rules", "list", "--json"], env=env, cwd=tmp_path).stdout)
    assert len(listed) == len(list((ROOT / "rules").glob("*.yaml")))
    schema = run([mapper, "rules", "schema"], env=env, cwd=tmp_path).stdout
    assert json.loads(schema) == json.loads((ROOT / "schemas" / "ruleset.v1.json").read_text(encoding="utf-8"))


# --- every import is declared (static, fast) ----------------------------------------------------
ELSEWHERE = {
    # the reference dump script runs in the user's gpt-neox environment, not beside mapper
    "megatron": "mapper/verify/neox_reference_dump.py",
    "deepspeed": "mapper/verify/neox_reference_dump.py",
}
USED_WITHOUT_IMPORT = {"numpy": "Tensor.numpy() hands tensor bytes to the writers (mapper/formats)"}


def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> files importing it, for every import outside a ``try: ... except
    ImportError`` and every module named to ``require(module, package, why)``."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "mapper").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = {id(node) for handler in ast.walk(tree) if isinstance(handler, ast.Try)
                   and any("ImportError" in ast.unparse(h.type or ast.Name("BaseException")) for h in handler.handlers)
                   for statement in handler.body for node in ast.walk(statement)}
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import) and id(node) not in guarded:
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and id(node) not in guarded:
                names = [node.module]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "require"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                names = [node.args[0].value]
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib and top != "mapper":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_library_the_package_imports_is_a_declared_dependency():
    declared = declared_dependencies()
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, files in third_party_imports().items():
        if module in ELSEWHERE:
            assert files == {ELSEWHERE[module]}, f"{module} is imported outside the reference dump script: {files}"
            continue
        distributions = {normalise(d) for d in providers.get(module, [module])}
        if not distributions & declared.keys():
            undeclared[module] = sorted(files)
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"
    for module in USED_WITHOUT_IMPORT:
        assert module in declared
    assert "transformers" in declared  # the HF folder's tokenizer files and generation_config.json need it
