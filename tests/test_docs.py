"""The docs are true: every repository path and `make` target that the READMEs and the job scripts' docstrings name
exists. A path is a token that starts with one of the repository's own top-level folders (``conf/...yaml``,
``pipelines/x.py``, ``cluster/...``, ``bench/ops/*.py``); ``runs/...``, ``s3://...``, ``../shared/...`` and
placeholders (``<...>``, ``{...}``, ``CHANGE-ME``, ``...``) are not repository paths and are not checked. A README in a
folder may also name a file by its bare name in backticks (`rayjob-proposals.yaml`): it is in that folder or at
the repository root."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "cluster/README.md", "bench/README.md"]
DOCSTRING_DIRS = ["pipelines", "trainers"]
REPO_DIRS = ("conf", "pipelines", "trainers", "bench", "cluster", "maskflow", "ops", "tests")
# A repository path starts a token: not preceded by a word character, '.', '/', ':', '@' or '-' (so the `conf/` in
# `s3://bucket/conf/x` or `runs/demo/conf/x` is not one).
PATH = re.compile(r"(?<![\w./:@-])((?:" + "|".join(REPO_DIRS) + r")/[\w./*<>{}$-]*)")
PLACEHOLDER = re.compile(r"[<>{}$]|\.\.\.|CHANGE-ME")
# A bare file name in backticks, in a README below the root.
BARE = re.compile(r"`([\w.-]+\.(?:py|ya?ml|json|md|toml|txt))`")
# `make <target>` where it is a command: at the start of a line (code blocks, docstring examples) or in backticks.
MAKE = re.compile(r"(?:^[ \t]*|`)make ([\w-]+)", re.MULTILINE)
# Names the docstrings use as examples of any script, not as a file of this repository.
ALLOWED = {("pipelines/_bootstrap.py", "pipelines/x.py")}


def docstrings(path: Path) -> str:
    tree = ast.parse(path.read_text())
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                         ast.AsyncFunctionDef))]
    return "\n".join(doc for n in nodes if (doc := ast.get_docstring(n, clean=False)))


def sources() -> dict[str, str]:
    """{repository-relative file: the text that names paths}: the READMEs whole, the scripts' docstrings."""
    texts = {doc: (ROOT / doc).read_text() for doc in DOCS}
    for folder in DOCSTRING_DIRS:
        for script in sorted((ROOT / folder).glob("*.py")):
            texts[script.relative_to(ROOT).as_posix()] = docstrings(script)
    return texts


def named_paths(text: str) -> set[str]:
    paths = set()
    for match in PATH.finditer(text):
        path = match.group(1).rstrip(".,;:")  # sentence punctuation after a path
        if not PLACEHOLDER.search(path):
            paths.add(path)
    return paths


def bare_names(doc: str, text: str) -> set[str]:
    """Bare file names a README below the root names, as repository paths (beside it, else at the root)."""
    folder = Path(doc).parent
    if doc not in DOCS or folder == Path("."):
        return set()
    names = set(BARE.findall(text))
    return {(folder / n).as_posix() if (ROOT / folder / n).exists() or not (ROOT / n).exists() else n for n in names}


def exists(path: str) -> bool:
    return any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE))


def test_pattern_finds_repository_paths_only():
    text = ("run `pipelines/proposals.py --config conf/proposals/demo.yaml`, then bench/ops/*.py. Output goes to\n"
            "runs/demo/conf/x.yaml or s3://bucket/conf/y.yaml, see ../shared/ROADMAP.md and conf/<job>/<name>.yaml;\n"
            "(cluster/README.md), output.uri=s3://CHANGE-ME/conf/z.yaml, maskflow.stage, conf/x/CHANGE-ME.yaml")
    assert named_paths(text) == {"pipelines/proposals.py", "conf/proposals/demo.yaml", "bench/ops/*.py",
                                 "cluster/README.md"}
    assert MAKE.findall("```bash\nmake demo\n```\nThen `make test` or make sure; `make bench ARGS=-k x`") == \
        ["demo", "test", "bench"]
    assert bare_names("cluster/README.md", "`rayjob-proposals.yaml`, `pyproject.toml`, `new.yaml`, `ray.init`") == \
        {"cluster/rayjob-proposals.yaml", "pyproject.toml", "cluster/new.yaml"}
    assert bare_names("README.md", "`ffd.py`") == set()  # the root README names ops by module in its ops table


def test_every_path_the_docs_name_exists():
    named = {(source, path) for source, text in sources().items()
             for path in named_paths(text) | bare_names(source, text)}
    assert any(path.startswith("conf/") for _, path in named) and any(s.startswith("pipelines/") for s, _ in named)
    missing = sorted((source, path) for source, path in named - ALLOWED if not exists(path))
    assert not missing, "paths named in the docs that are not in the repository:\n" + "\n".join(
        f"  {path}  (named in {source})" for source, path in missing)


def test_every_make_target_the_docs_name_exists():
    targets = make_targets()
    named = {(source, target) for source, text in sources().items() for target in MAKE.findall(text)}
    assert {"demo", "test"} <= {target for _, target in named}
    missing = sorted((source, target) for source, target in named if target not in targets)
    assert not missing, "make targets named in the docs that the Makefile lacks:\n" + "\n".join(
        f"  make {target}  (named in {source})" for source, target in missing)
