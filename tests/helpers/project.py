"""A throwaway copy of the convpipe project in its own git + DVC repo, driven by the real CLIs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from optuna.storages.journal import JournalFileBackend, JournalStorage
from ruamel.yaml import YAML

from convpipe.config.edit import set_dotted

ROOT = Path(__file__).resolve().parents[2]
COPIED = [
    "src",
    "pipelines",
    "params.yaml",
    "params",  # the recipes
    "dvc.yaml",
    "requirements.lock",  # a dependency of the train stage
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvc/plots",  # the plot templates dvc.yaml names (by_class)
    ".dvcignore",
    ".gitignore",
]


def project_env(root: Path) -> dict[str, str]:
    """Environment where `python`/`dvc` are this venv's and `convpipe` is the copy's code."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(root / "src")
    env["TQDM_DISABLE"] = "1"
    env.pop("MLFLOW_TRACKING_URI", None)  # a test project tracks into its own mlflow.db
    env.setdefault("GIT_AUTHOR_NAME", "convpipe-test")
    env.setdefault("GIT_AUTHOR_EMAIL", "test@localhost")
    env.setdefault("GIT_COMMITTER_NAME", "convpipe-test")
    env.setdefault("GIT_COMMITTER_EMAIL", "test@localhost")
    return env


class Project:
    """A copy of the project under ``root`` with helpers to run commands in it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = project_env(root)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in the project; fail with its output when ``check`` and it fails."""
        proc = subprocess.run(
            cmd, cwd=self.root, env=self.env, capture_output=True, text=True, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def sh(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a shell command line (as a README shows it) in the project."""
        return self.run("bash", "-c", command, check=check)

    def set_params(self, **updates: object) -> None:
        """Edit params.yaml in place with dotted keys, keeping its comments."""
        self._write_params("params.yaml", updates)

    def params_copy(self, name: str, **updates: object) -> str:
        """``<name>.yaml``: params.yaml with dotted-key updates, for ``convpipe --params``."""
        self._write_params(f"{name}.yaml", updates)
        return f"{name}.yaml"

    def _write_params(self, target: str, updates: dict[str, object]) -> None:
        yaml = YAML()
        data = yaml.load(self.root / "params.yaml")
        for key, value in updates.items():
            set_dotted(data, key, value)
        yaml.dump(data, self.root / target)


def documented_commands(journey: str) -> list[str]:
    """The ``$ `` command lines of the doc blocks marked ``<!-- journey: NAME -->``.

    The blocks live in ``README.md`` and the pages of ``docs/`` (in the order of the site's
    pages); journey tests run these very lines, so the docs cannot drift from what is tested.
    ``make run`` stands for ``dvc repro`` here: the test's environment is already set up.
    """
    marker = f"<!-- journey: {journey} -->"
    commands: list[str] = []
    for page in documented_pages():
        text = page.read_text(encoding="utf-8")
        for part in text.split(marker)[1:]:
            block = part.split("```", 2)[1]  # the fenced block right after the marker
            commands += [line[2:] for line in block.splitlines() if line.startswith("$ ")]
    if not commands:
        raise AssertionError(f"no doc page has commands for journey {journey!r}")
    return [cmd.replace("make run", "dvc repro") for cmd in commands]


def documented_pages() -> list[Path]:
    """README.md, then every page of the site in ``mkdocs.yml``'s nav order."""
    nav = YAML(typ="safe").load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]
    pages = [ROOT / "docs" / next(iter(item.values())) for item in nav]
    return [ROOT / "README.md", *pages]


def make_project(dest: Path) -> Project:
    """Copy the project's sources into ``dest`` and make it a git repo with one commit."""
    dest.mkdir(parents=True, exist_ok=True)
    for item in COPIED:
        src = ROOT / item
        target = dest / item
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)
    project = Project(dest)
    project.run("git", "init", "-q", "-b", "main")
    project.run("git", "add", "-A")
    project.run("git", "commit", "-q", "-m", "init")
    return project


def journal(path: Path) -> JournalStorage:
    """Optuna's own reader of a ``journal:`` storage file (independent of convpipe's)."""
    return JournalStorage(JournalFileBackend(str(path)))
