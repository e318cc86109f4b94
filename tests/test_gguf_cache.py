"""recipes/gguf_cache.py: a .gguf is converted once per file version, never left half-written, and read back as
the same model and tokenizer the .gguf itself gives."""
import os
import time
from pathlib import Path

import pytest
import torch

from recipes import gguf_cache


def fake_gguf(folder: Path, content: bytes = b"weights") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.gguf"
    path.write_bytes(content)
    return path


class Converter:
    """Writes the .gguf's bytes into the folder and counts its calls; ``fail`` makes it raise half-way."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail = 0, fail

    def __call__(self, gguf: Path, folder: Path) -> None:
        self.calls += 1
        (folder / "model.safetensors").write_bytes(gguf.read_bytes())
        if self.fail:
            raise RuntimeError("conversion killed half-way")


def test_converted_once_per_version_of_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path / "cache"))
    gguf, convert = fake_gguf(tmp_path / "model"), Converter()
    first = gguf_cache.cached_checkpoint(gguf, convert)
    assert first.parent == tmp_path / "cache" / "gguf" and (first / "model.safetensors").read_bytes() == b"weights"
    assert gguf_cache.cached_checkpoint(gguf, convert) == first and convert.calls == 1
    time.sleep(0.01)
    gguf.write_bytes(b"other weights")  # a replaced file (new size and time): a new entry, made from it
    second = gguf_cache.cached_checkpoint(gguf, convert)
    assert second != first and convert.calls == 2 and (second / "model.safetensors").read_bytes() == b"other weights"


def test_a_failed_conversion_leaves_nothing_and_the_next_call_converts(tmp_path, monkeypatch):
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path / "cache"))
    gguf = fake_gguf(tmp_path / "model")
    with pytest.raises(RuntimeError, match="killed half-way"):
        gguf_cache.cached_checkpoint(gguf, Converter(fail=True))
    assert os.listdir(tmp_path / "cache" / "gguf") == [".lock"]  # no entry, no staging folder
    stale = tmp_path / "cache" / "gguf" / f".{gguf_cache.entry_name(gguf)}.killed"  # as a SIGKILL leaves it
    stale.mkdir()
    entry = gguf_cache.cached_checkpoint(gguf, Converter())
    assert (entry / "model.safetensors").is_file() and not stale.exists()


def test_the_cached_smollm2_is_the_gguf_s_own_model_and_tokenizer(selora_cache):
    """Bit for bit: the cached float32 weights (and bf16 casts of them) are what transformers de-quantizes the .gguf
    to, and the cached tokenizer encodes a chat exactly as the .gguf's."""
    from launch.config import resolve
    from recipes.modeling import _read_gguf, _read_gguf_tokenizer, load_model, load_tokenizer, model_source
    cfg = resolve("llama_selora")
    _, gguf = model_source(cfg.model)
    cached, _ = load_model(cfg.model, torch.device("cpu"))
    assert any(selora_cache.rglob("model.safetensors"))
    direct = _read_gguf(gguf, torch.float32)
    for (name, a), (_, b) in zip(cached.state_dict().items(), direct.state_dict().items()):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), name
    weight = direct.model.layers[3].mlp.down_proj.weight
    bf16 = resolve("llama_selora", ["model.dtype=bfloat16"]).model
    assert torch.equal(load_model(bf16, torch.device("cpu"))[0].model.layers[3].mlp.down_proj.weight,
                       weight.to(torch.bfloat16))
    tokenizer, reference = load_tokenizer(cfg.tokenizer, cfg.model), _read_gguf_tokenizer(gguf)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name 3 primes <|im_end|>"}]
    assert (tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            == reference.apply_chat_template(messages, add_generation_prompt=True))
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.chat_template) == \
        (reference.bos_token, reference.eos_token, reference.chat_template)


def test_gguf_cache_false_reads_the_file_itself(tmp_path, monkeypatch, tiny_llama):
    from launch.config import resolve
    from recipes import modeling
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path / "cache"))
    read = []
    monkeypatch.setattr(modeling, "_read_gguf", lambda path, dtype: read.append((path, dtype)) or tiny_llama())
    cfg = resolve("llama_selora", ["model.gguf_cache=false"]).model
    modeling.load_model(cfg, torch.device("cpu"))
    assert read == [(modeling.model_source(cfg)[1], torch.float32)] and not (tmp_path / "cache").exists()


def test_where_no_cache_can_be_written_the_file_is_read_after_a_warning(tmp_path, monkeypatch, capsys, tiny_llama):
    from launch.config import resolve
    from recipes import modeling
    (tmp_path / "not_a_folder").write_text("")
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path / "not_a_folder"))  # its gguf/ can never be made
    read = []
    monkeypatch.setattr(modeling, "_read_gguf", lambda path, dtype: read.append(path) or tiny_llama())
    cfg = resolve("llama_selora").model
    modeling.load_model(cfg, torch.device("cpu"))
    assert read == [modeling.model_source(cfg)[1]]
    err = capsys.readouterr().err
    assert "warning: cannot keep a de-quantized copy of SmolLM2-135M-Instruct.Q4_1.gguf" in err and "SELORA_CACHE" in err
