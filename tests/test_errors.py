"""Every bad input in docs/errors.md's table, driven through launch/train.py's main: exit status 2, exactly one
`error:` line (the table's message), no traceback, and the files of a previous run in the output directory
byte-identical afterwards. The table is read from the doc, so the doc and the behaviour cannot drift apart.

In the table, `<run>` is a finished 4-step llama_selora run (checkpoints at steps 2 and 4), `<corrupt>` a copy
of it whose step-4 adapter weights had one byte flipped (same size), `<bare>` a copy without its checkpoints,
`<file>` a regular file, `<data>` a folder of bad data files, `<new>` an empty folder; `...` stands for text
that depends on the machine. Unless a row names train.output_dir, it runs with train.output_dir=<run>.
"""
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.train import main

from conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "errors.md"
ROW = re.compile(r"\| `([^`]*)` \|([^|`]*)\| `([^`]*)` \|")


def table_rows() -> list[tuple[str, str, str]]:
    """(input, situation, message) of every row of docs/errors.md's table."""
    rows = []
    for line in DOC.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        match = ROW.fullmatch(line.strip())
        assert match, f"docs/errors.md: a row should read | `command` | situation | `message` |: {line}"
        rows.append((match.group(1), match.group(2).strip(), match.group(3)))
    return rows


ROWS = table_rows()


def tree_hashes(*roots: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def places(tmp_path_factory, finished_run) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("errors")
    run = finished_run  # conftest's: a finished 4-step llama_selora run, checkpoints at steps 2 and 4
    corrupt, bare = base / "corrupt", base / "bare"
    shutil.copytree(run, corrupt)
    weights = corrupt / "checkpoints" / "step_4" / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    shutil.copytree(run, bare)
    shutil.rmtree(bare / "checkpoints")
    (base / "file").write_text("not a directory\n")
    folder = base / "data"
    folder.mkdir()
    (folder / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b"\n')
    (folder / "empty.jsonl").write_text("")
    # Files only a library can judge: DeepSpeed's config parser, transformers' tokenizer and model loaders.
    (folder / "ds_typo.json").write_text('{"zero_optimization": {"stage": 2, "stagee": 2}}')
    (folder / "ds_broken.json").write_text('{zero_optimization: 2}')
    (folder / "broken_tokenizer").mkdir()
    (folder / "broken_tokenizer" / "tokenizer.json").write_text('{"model": {}}')  # no "added_tokens"
    (folder / "broken_tokenizer" / "tokenizer_config.json").write_text("{}")
    (folder / "broken_model").mkdir()
    (folder / "broken_model" / "config.json").write_text('{"model_type": "llama", "hidden_size": "wide"}')
    (folder / "broken_model" / "model.safetensors").write_bytes(b"not safetensors")
    return {"run": run, "corrupt": corrupt, "bare": bare, "file": base / "file", "data": folder, "base": base}


def fill(text: str, places: dict[str, Path], new: Path) -> str:
    for name, path in {**places, "new": new}.items():
        text = text.replace(f"<{name}>", str(path))
    return text


def pattern(message: str, places: dict[str, Path], new: Path) -> re.Pattern:
    """The doc's message as a regex: placeholders become their paths, `...` any text."""
    parts = re.split(r"(\.\.\.|<\w+>)", message)
    out = []
    for part in parts:
        if part == "...":
            out.append(".*")
        elif re.fullmatch(r"<\w+>", part) and part[1:-1] in {**places, "new": 1}:
            out.append(re.escape(fill(part, places, new)))
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


def command(argv: str, places: dict[str, Path], new: Path) -> list[str]:
    args = shlex.split(fill(argv, places, new)) + TINY_MODEL
    if not any(a.startswith("train.output_dir=") for a in args):
        args.append(f"train.output_dir={places['run']}")
    return args


@pytest.mark.parametrize("argv, situation, message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(argv, situation, message, places, tmp_path, capsys,
                                                         monkeypatch):
    if situation == "no 4-bit kernels":
        from selora import quant
        monkeypatch.setattr(quant, "quantization_available", lambda kind, device: "no CUDA and no CPU kernels")
    elif situation == "wandb not installed":
        monkeypatch.setitem(sys.modules, "wandb", None)
    elif situation == "transformers before 4.53":  # no masking_utils: the import fails as on an old release
        import transformers  # an earlier import in this process left the submodule on the package too (looking
        monkeypatch.delattr(transformers, "masking_utils", raising=False)  # imports it, so before the block below)
        monkeypatch.setitem(sys.modules, "transformers.masking_utils", None)
    else:
        assert situation == "", f"docs/errors.md: unknown situation {situation!r}; give tests/test_errors.py a setup"
    new = tmp_path / "new"
    before = tree_hashes(places["run"], places["corrupt"], places["bare"])
    capsys.readouterr()
    code = main(command(argv, places, new))
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert code == 2, captured.err[-2000:]
    assert len(errors) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert pattern(message, places, new).fullmatch(errors[0]), f"\n doc: {message}\n got: {errors[0]}"
    assert tree_hashes(places["run"], places["corrupt"], places["bare"]) == before
    assert not new.exists() or not any(new.iterdir())


def test_the_command_line_prints_one_line_and_exits_2(places, tmp_path):
    """The same through a real process: nothing but the one line on stderr."""
    argv, _, message = next(r for r in ROWS if "learning_rate=-" in r[0])
    result = subprocess.run([sys.executable, "launch/train.py", *command(argv, places, tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [result.stderr.strip()] and pattern(message, places, tmp_path).fullmatch(
        result.stderr.strip()), result.stderr
