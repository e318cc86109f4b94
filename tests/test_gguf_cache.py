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
        for name in set(gguf_cache.REQUIRED) - {"model.safetensors"}:
            (folder / name).write_text("{}")


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
    import gguf as gguf_py  # the conversion's once-parsed file and maps are gone: the direct read is transformers' own
    assert gguf_py.get_tensor_name_map is gguf_py.tensor_mapping.get_tensor_name_map
    assert gguf_py.GGUFReader is gguf_py.gguf_reader.GGUFReader
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


def test_a_poisoned_entry_is_rebuilt_with_one_warning(tmp_path, monkeypatch, capsys):
    """The entry a two-process cold start used to leave (transformers wrote the tokenizer on rank 1 but the model
    only on rank 0): exactly those files, the old completion marker, no config and no weights."""
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path / "cache"))
    gguf, convert = fake_gguf(tmp_path / "model"), Converter()
    poisoned = gguf_cache.cache_root() / gguf_cache.entry_name(gguf)
    poisoned.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "selora_gguf_source.txt"):
        (poisoned / name).write_text("{}")
    entry = gguf_cache.cached_checkpoint(gguf, convert)
    assert entry == poisoned and convert.calls == 1 and (entry / "model.safetensors").read_bytes() == b"weights"
    assert not (entry / "selora_gguf_source.txt").exists()  # the old entry was replaced whole
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: the de-quantized copy of model.gguf in {entry} is incomplete (no manifest); "
                        "rebuilding it"]
    # A truncated weight file (a full disk, a copy cut short) is caught by its size and rebuilt too.
    (entry / "model.safetensors").write_bytes(b"wei")
    assert gguf_cache.cached_checkpoint(gguf, convert) == entry and convert.calls == 2
    assert "model.safetensors has 3 bytes, the manifest says 7" in capsys.readouterr().err
    assert gguf_cache.cached_checkpoint(gguf, convert) == entry and convert.calls == 2  # complete: reused


def test_a_conversion_that_writes_no_weights_is_an_error_not_an_entry(tmp_path, monkeypatch):
    from recipes.shared_build import BuildFailed
    monkeypatch.setenv("SELORA_CACHE", str(tmp_path / "cache"))
    gguf = fake_gguf(tmp_path / "model")

    def tokenizer_only(gguf, folder):  # what save_pretrained on a rank other than 0 used to leave
        (folder / "tokenizer.json").write_text("{}")

    with pytest.raises(BuildFailed, match="wrote no config.json, model.safetensors, tokenizer_config.json"):
        gguf_cache.cached_checkpoint(gguf, tokenizer_only)
    assert os.listdir(tmp_path / "cache" / "gguf") == [".lock"]


def test_conversion_writes_weights_on_a_rank_other_than_0(tmp_path, monkeypatch, tiny_llama):
    """transformers' save_pretrained writes nothing unless it runs on global rank 0; the converter does not use it
    for the weights, so the rank that builds the cache writes a loadable model whatever its number."""
    from transformers import AutoModelForCausalLM
    from transformers.distributed import mixin
    from recipes import modeling
    model = tiny_llama(tie_word_embeddings=True)
    monkeypatch.setattr(modeling, "_read_gguf", lambda path, dtype: model)
    monkeypatch.setattr(modeling, "_read_gguf_tokenizer", lambda path: _Tokenizer())
    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)  # as on rank 1 of a group
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    folder = tmp_path / "entry"
    folder.mkdir()
    modeling._convert_gguf(tmp_path / "m.gguf", folder)
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    for (name, a), (_, b) in zip(loaded.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied again


class _Tokenizer:
    def save_pretrained(self, folder):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (Path(folder) / name).write_text("{}")
