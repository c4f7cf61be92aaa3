"""Every repository path that the docs, docstrings and comments cite exists, so a moved file cannot
leave stale pointers behind (eight did once: `resume.py`, `sharding.py` and two more, still cited under
train/ after they had moved to train/infra/).

Scanned: README.md and docs/**/*.md (text, and relative links resolved from the page's folder, with
their #anchors checked against the target page's headings as GitHub names them);
docstrings and comments of every tracked *.py file; comments of conf/**/*.yaml and of the shell
scripts in slurm/ and .ci/. A cited path starts with a top-level folder (models/ data/ train/ conf/
tests/ slurm/ docs/ .ci/) or is a top-level file (README.md, pyproject.toml). Not paths: metric names
that share a prefix (`train/loss`, `data/skipped_samples`: under data/ and train/ only names with a
file extension or a trailing slash count), run-time outputs (outputs/..., data_cache/...), placeholders
(`<name>`, `...`). Globs must match something; `{a,b}` alternatives are expanded."""

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP = ("models", "data", "train", "conf", "tests", "slurm", "docs", ".ci")
METRIC_PREFIXES = ("data/", "train/")  # also metric namespaces (train/loss, data/padding_fraction)
TOP_FILES = ("README.md", "pyproject.toml")
PATH = re.compile(r"(?<![\w/.\-])((?:" + "|".join(re.escape(t) for t in TOP) + r")/[\w./*{},<>\-]*|"
                  + "|".join(re.escape(f) for f in TOP_FILES) + r")(?![\w/])")
LINK = re.compile(r"\]\(([^)\s]+)\)")


NOT_SOURCES = {".git", ".venv", "outputs", "data_cache", "multirun", "logs", "wandb", "build", "__pycache__", ".cache",
               ".pytest_cache"}  # run-time outputs and environments (.gitignore), when there is no git checkout


def tracked(*patterns: str) -> list[Path]:
    """The repository's files matching `patterns`: git's list, or the tree without run-time outputs."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *patterns], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        return sorted({ROOT / p for p in out.split("\0") if p and (ROOT / p).is_file()})
    except (OSError, subprocess.CalledProcessError):
        files = {f for pattern in patterns for f in ROOT.glob(pattern) if f.is_file()}
        return sorted(f for f in files if not NOT_SOURCES & set(f.relative_to(ROOT).parts)
                      and not any(part.endswith(".egg-info") for part in f.parts))


def python_prose(path: Path) -> str:
    """Docstrings and comments of a Python file."""
    source = path.read_text()
    parts = [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            parts.append(ast.get_docstring(node) or "")
    return "\n".join(parts)


def comments(path: Path) -> str:
    """The `#` comments of a YAML or shell file (a `#` at the line start or after a space)."""
    return "\n".join(m[1] for line in path.read_text().splitlines() if (m := re.search(r"(?:^|\s)(#.*)", line)))


def expand(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*,[^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m[1].split(",") for q in expand(path[: m.start()] + alt + path[m.end():])]


def cited(text: str) -> set[str]:
    out = set()
    for raw in PATH.findall(text):
        path = raw.rstrip(".,:;")
        if "<" in path or ">" in path or "..." in path:
            continue
        last = path.rstrip("/").rsplit("/", 1)[-1]
        if path.startswith(METRIC_PREFIXES) and not (path.endswith("/") or "." in last):
            continue
        out.update(expand(path))
    return out


def exists(path: str, base: Path = ROOT) -> bool:
    if any(c in path for c in "*?["):
        return any(base.glob(path))
    return (base / path).exists()


def sources() -> dict[str, str]:
    """Scanned text per file (repository-relative name -> text)."""
    out = {}
    for p in tracked("README.md", "docs/*.md", "docs/**/*.md"):
        out[str(p.relative_to(ROOT))] = p.read_text()
    for p in tracked("*.py", "**/*.py"):
        out[str(p.relative_to(ROOT))] = python_prose(p)
    for p in tracked("conf/*.yaml", "conf/**/*.yaml", "slurm/*", ".ci/*"):
        out[str(p.relative_to(ROOT))] = comments(p)
    return out


SOURCES = sources()


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_cited_paths_exist(name):
    missing = sorted(p for p in cited(SOURCES[name]) if not exists(p))
    assert not missing, f"{name} cites paths that do not exist: {missing}"


def anchors(page: Path) -> set[str]:
    """GitHub's ids of a Markdown page's headings (fenced code skipped): lower case, punctuation dropped,
    spaces to hyphens, `-1`, `-2`, ... for repeats."""
    out, seen, fenced = set(), {}, False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*)", line)):
            slug = re.sub(r"[^\w\- ]", "", m[1].strip().lower()).replace(" ", "-")
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return out


@pytest.mark.parametrize("name", sorted(n for n in SOURCES if n.endswith(".md")))
def test_relative_links_resolve(name):
    page = ROOT / name
    bad = []
    for link in LINK.findall(SOURCES[name]):
        if re.match(r"[a-z]+:", link):  # a URL
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target) if target else page
        if not path.exists():
            bad.append(link)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            bad.append(f"{link} (no such heading)")
    assert not bad, f"{name} links to files or headings that do not exist: {bad}"


def test_the_scanner_finds_paths():
    """The rules above, on the forms they are meant for."""
    text = ("`models/plan.py`, conf/arch/, `train/infra/resume.py`. See docs/results/pareto.md; train/loss and "
            "data/skipped_samples are metrics; conf/arch/<name>.yaml and outputs/x are not repo paths; "
            "conf/experiment/llava15_7b_{pretrain,finetune}.yaml; torchtitan/models/README.md is elsewhere; pyproject.toml")
    assert cited(text) == {"models/plan.py", "conf/arch/", "train/infra/resume.py", "docs/results/pareto.md",
                           "conf/experiment/llava15_7b_pretrain.yaml", "conf/experiment/llava15_7b_finetune.yaml",
                           "pyproject.toml"}


def test_anchors_are_named_as_github_names_them(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Timing plans: `python -m train bench`\n```bash\n# not a heading\n```\n## The method -> policy table\n## Speed\n## Speed\n")
    assert anchors(page) == {"timing-plans-python--m-train-bench", "the-method---policy-table", "speed", "speed-1"}
