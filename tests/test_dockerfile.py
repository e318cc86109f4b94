"""README.md's two commands are what the Dockerfile and CI (.ci/run) actually run: the Dockerfile installs with
README's steps after its torch pin, and .ci/run runs README's test command verbatim inside a fresh venv."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """README's one-line set-up commands (those that start with the torch pin)."""
    commands = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("pip install torch==")]
    assert len(commands) == 2, f"README.md should hold two set-up commands starting with the torch pin: {commands}"
    return commands


def install_steps(command: str) -> str:
    """The steps between the torch pin and the command that runs something (what a GPU machine runs)."""
    steps = [s.strip() for s in command.split("&&")]
    return " && ".join(s for s in steps[1:] if "pip install" in s)


def test_readmes_two_commands_install_the_same_way():
    default_job, tests = readme_commands()
    assert default_job.endswith("python launch/train.py --recipe llama_selora")
    assert tests.endswith("python -m pytest -q")
    assert install_steps(default_job) == install_steps(tests)


def test_dockerfile_runs_readmes_project_install_steps():
    step = install_steps(readme_commands()[0])
    runs = [m.group(1).strip() for m in re.finditer(r"^RUN (.+)$", (ROOT / "Dockerfile").read_text(), re.M)]
    assert step in runs, f"README installs with {step!r}; the Dockerfile runs {runs}"


def test_dockerfile_default_command_is_readmes_default_job():
    assert 'CMD ["python", "launch/train.py", "--recipe", "llama_selora"]' in (ROOT / "Dockerfile").read_text()


def test_readmes_commands_install_the_pinned_set():
    assert all("-c constraints.txt" in command for command in readme_commands())
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==\S+", pin) for pin in pins), pins
    names = {pin.split("==")[0].lower().replace("_", "-") for pin in pins}
    assert {"transformers", "deepspeed", "bitsandbytes", "datasets", "peft"} <= names and "torch" not in names


def test_ci_runs_readmes_test_command_in_a_fresh_venv():
    script = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in script.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert readme_commands()[1] in lines, "the last step of .ci/run must be README's test command, verbatim"
    assert lines[-1] == readme_commands()[1]  # last: its exit status is CI's
    # First contact before the tests, on an empty HOME: the design's two-process command, then the default job.
    default_job = lines.index(readme_commands()[0])
    readme_install = f"pip install torch==2.13.0 && {install_steps(readme_commands()[0])} && "
    design = next(i for i, line in enumerate(lines) if line.startswith(readme_install)
                  and "deepspeed --num_gpus 2 launch/train.py --recipe llama_selora" in line)
    home = next(i for i, line in enumerate(lines) if line.startswith("export HOME="))
    assert home < design < default_job < len(lines) - 1
    assert "set -euo pipefail" in lines
    venv = next(i for i, line in enumerate(lines) if re.search(r"python3? -m venv ", line))
    activate = next(i for i, line in enumerate(lines) if re.search(r"(source|\.) .*/bin/activate", line))
    assert venv < activate < len(lines) - 1
    assert "--system-site-packages" not in script
