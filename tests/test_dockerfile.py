"""The Dockerfile installs the project with the same step README.md's set-up command uses after its torch pin."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_install_step() -> str:
    for line in (ROOT / "README.md").read_text().splitlines():
        if "pip install torch==" in line:
            steps = [s.strip() for s in line.split("&&")]
            return next(s for s in steps if "pip install -e" in s)
    raise AssertionError("README.md has no set-up command with 'pip install torch=='")


def test_dockerfile_runs_readmes_project_install_step():
    step = readme_install_step()
    runs = [m.group(1).strip() for m in re.finditer(r"^RUN (.+)$", (ROOT / "Dockerfile").read_text(), re.M)]
    assert step in runs, f"README installs with {step!r}; the Dockerfile runs {runs}"


def test_dockerfile_default_command_is_readmes_default_job():
    readme = (ROOT / "README.md").read_text()
    assert "python launch/train.py --recipe llama_selora" in readme
    assert 'CMD ["python", "launch/train.py", "--recipe", "llama_selora"]' in (ROOT / "Dockerfile").read_text()
