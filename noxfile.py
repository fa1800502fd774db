"""Developer sessions: ``nox -s tests lint typecheck docs bench fuzz``."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "docs", "tests"]
nox.options.reuse_existing_virtualenvs = True
PYTHON = "3.11"


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite (root and a Docker engine make it complete; see README)."""
    session.install("-e", ".[test,zstd]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff, lint and format check."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "ova2img", "tests", "benchmarks", "noxfile.py")
    session.run("ruff", "format", "--check", "ova2img")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package."""
    session.install("-e", ".", "mypy>=1.10", "types-docker")
    session.run("mypy")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation (MkDocs, API pages from the docstrings); warnings are errors."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks: ova2img against the root pipeline (run as root for the comparison)."""
    session.install("-e", ".[zstd]")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session(python=PYTHON)
def fuzz(session: nox.Session) -> None:
    """The long robustness campaign (>= 10,000 damaged inputs; as root for the corpus tools)."""
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/fuzz_run.py", *(session.posargs or ["-n", "10000"]))
