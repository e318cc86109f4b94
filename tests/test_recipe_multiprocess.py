"""The recipe under real 2-process DeepSpeed ZeRO-3 on CPU (gloo, every parameter partitioned): it runs to the
end with SeLoRA + SRLoRA and its PEFT export loads; one more launch runs the design's own command,
`deepspeed launch/train.py --recipe llama_selora`, on 2 processes. (Runs killed with SIGKILL during training and
during a checkpoint write, stopped by signals and resumed exactly, with SRLoRA, are tests/test_slurm.py's
two-node test: 4 ranks through the sbatch script.)
"""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, free_port, torchrun

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.multiprocess

STEPS = 12
# with gradient checkpointing (tests/test_slurm.py's 4 ranks run without); ZeRO-3 gathers each decoder layer whole
ARGS = ["launch/train.py", "--recipe", "llama_selora_srlora", "deepspeed.config=zero3", "model.gradient_checkpointing=true",
        "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}",
        f"train.max_steps={STEPS}", "train.save_every=4", "train.warmup_steps=2", "train.eval_every=6",
        "srlora.schedule=fixed", "srlora.start_step=3", "srlora.interval=3", "srlora.end_step=9", "data.max_train_records=400", *TINY_MODEL]
CPU = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch(output_dir: Path, extra_env: dict | None = None, background: bool = False, args: list[str] = ARGS,
           launcher: str = "torchrun"):
    """Two ranks of ``args`` on this machine. torchrun by default: DeepSpeed's launcher (``launcher="deepspeed"``,
    kept for the design's own command) starts two more Python processes that import DeepSpeed before the ranks
    start, about 12 s of a tiny two-rank run's 34 on 2 cores; the ranks run the same recipe either way."""
    env = {**os.environ, **CPU, **(extra_env or {})}
    starter = (["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())] if launcher == "deepspeed" else
               torchrun(2))
    command = starter + args + [f"train.output_dir={output_dir}"]
    log = open(output_dir.parent / f"{output_dir.name}.log", "a")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    if background:
        return process
    process.wait(timeout=600)
    return process


def losses(output_dir: Path) -> dict[int, float]:
    lines = [json.loads(l) for l in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {l["step"]: l["loss"] for l in lines if "loss" in l}


def events(output_dir: Path) -> list:
    lines = [json.loads(l) for l in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [e for l in lines for e in l.get("srlora", [])]


def last_step(output_dir: Path) -> int:
    try:
        return max(losses(output_dir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi") / "straight"
    out.mkdir()
    assert launch(out).returncode == 0, (out.parent / "straight.log").read_text()[-3000:]
    return out


def test_zero3_recipe_runs_to_the_end_and_exports_a_peft_adapter(straight):
    assert "ZeRO-3 gathers each LlamaDecoderLayer whole" in (straight.parent / "straight.log").read_text()
    assert sorted(losses(straight)) == list(range(1, STEPS + 1))
    assert {e["step"] for e in events(straight)} == {3, 6, 9}
    from peft import PeftModel
    from launch.config import resolve
    from recipes.modeling import load_model
    from safetensors.torch import load_file
    import selora
    base, _ = load_model(resolve("llama_selora", TINY_MODEL).model, torch.device("cpu"))
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    peft_model = PeftModel.from_pretrained(base, str(straight / "peft_adapter")).eval()
    with torch.no_grad():
        peft_logits = peft_model(input_ids=ids).logits
    fresh, _ = load_model(resolve("llama_selora", TINY_MODEL).model, torch.device("cpu"))
    selora.load_adapter(fresh, straight / "adapter")
    fresh.eval()  # built from a config, the model is in training mode: adapter dropout would be on
    with torch.no_grad():
        selora_logits = fresh(input_ids=ids).logits
    assert ((peft_logits - selora_logits).norm() / selora_logits.norm()).item() < 1e-5
    saved = load_file(str(straight / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("base_delta_A") and v.shape[0] > 0 for k, v in saved.items())  # fusions were recorded


def test_zero3_with_the_recipes_persistence_threshold_recomposes_as_with_every_weight_partitioned(straight, tmp_path):
    """Under the recipe's own ZeRO-3 threshold the adapter factors (and, at this tiny width, the base weights) stay
    whole on every rank between steps, a copy beside each rank's shard. SRLoRA writes its recompositions into the
    shards: the whole copies are gathered again, so the losses after every recomposition equal the partitioned
    run's bit for bit (they drifted from step 4 on, after the first recomposition, while the copies went stale)."""
    default = tmp_path / "default_threshold"
    default.mkdir()
    args = [a for a in ARGS if "stage3_param_persistence_threshold" not in a]
    assert launch(default, args=args).returncode == 0, (tmp_path / "default_threshold.log").read_text()[-3000:]
    assert {e["step"] for e in events(default)} == {3, 6, 9}
    assert losses(default) == losses(straight)


def test_the_designs_command_runs_on_two_processes_with_zero2(tmp_path):
    """Exactly `deepspeed launch/train.py --recipe llama_selora` plus an output dir, a step cap and one sample
    prompt instead of the recipe's three (the recipe's own model and data): no DeepSpeed config is named, so ZeRO-2
    is chosen, said once, before the model loads; the base and fine-tuned answers are printed once, by rank 0.
    (Three prompts' answers took 80 of this test's 150 s on two ranks sharing 2 cores.)"""
    out = tmp_path / "design"
    cache = tmp_path / "cold_cache"  # a fresh machine's: the model cache starts empty, whatever ran before
    process = launch(out, args=["launch/train.py", "--recipe", "llama_selora", "train.max_steps=1",
                                "train.sample_prompts=['What is 2 plus 3?']"], extra_env={"SELORA_CACHE": str(cache)},
                     launcher="deepspeed")
    log = (tmp_path / "design.log").read_text()
    assert process.returncode == 0, log[-3000:]
    assert smollm2_entry_made_by(cache) == "0" and "warning" not in log  # local rank 0 converted, rank 1 waited
    notes = [line for line in log.splitlines() if "using ZeRO-2" in line]
    assert len(notes) == 1, notes  # rank 0 only
    assert log.index("using ZeRO-2") < log.index("trainable")  # before the parameter table
    assert log.count("base model:") == 1 and log.count("fine-tuned:") == 1
    assert sorted(losses(out)) == [1]
    engine_files = sorted(p.name for p in (out / "checkpoints" / "step_1" / "engine").rglob("*") if p.is_file())
    assert any("zero_pp_rank_1" in name for name in engine_files), engine_files  # optimizer sharded over 2 ranks
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def smollm2_entry_made_by(cache: Path) -> str:
    """The rank that converted the default model into ``cache``; the entry must be complete."""
    from launch.config import resolve
    from recipes import gguf_cache
    from recipes.modeling import model_source
    from recipes.shared_build import MANIFEST, incomplete
    entry = cache / "gguf" / gguf_cache.entry_name(model_source(resolve("llama_selora").model)[1])
    assert incomplete(entry) is None, incomplete(entry)
    files = json.loads((entry / MANIFEST).read_text())["files"]
    assert set(gguf_cache.REQUIRED) <= set(files) and files["model.safetensors"] > 500e6  # float32 SmolLM2
    return json.loads((entry / MANIFEST).read_text())["made_by"]["rank"]


def test_two_nodes_on_one_cache_with_rank_1_first_repair_a_poisoned_entry(tmp_path):
    """Two one-process "nodes" (each its node's local rank 0, so each may build) share one cache folder holding the
    half entry the old cold start left. Rank 0 is held back before the lock, so rank 1 converts: the entry is
    repaired with one warning line, written by rank 1 (transformers would have saved no weights there), and rank 0
    reads it. Plain processes with the launcher's variables, no launcher: the cheapest two-process run."""
    from launch.config import resolve
    from recipes import gguf_cache
    from recipes.modeling import model_source
    cache = tmp_path / "cache"
    poisoned = cache / "gguf" / gguf_cache.entry_name(model_source(resolve("llama_selora").model)[1])
    poisoned.mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "selora_gguf_source.txt"):
        (poisoned / name).write_text("{}")
    out, port = tmp_path / "run", str(free_port())
    env = {**os.environ, **CPU, "SELORA_CACHE": str(cache), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "SELORA_DELAY_LOCK_RANK": "0",
           "PYTHONPATH": f"{ROOT / 'tests' / 'fault_injection'}{os.pathsep}{ROOT}"}
    args = ["launch/train.py", "--recipe", "llama_selora", "train.max_steps=1", "train.sample_prompts=[]",
            "data.max_train_records=8", "train.export_peft=false", f"train.output_dir={out}"]
    logs = [tmp_path / f"rank{rank}.log" for rank in range(2)]
    processes = [subprocess.Popen(["python", *args], cwd=ROOT, env={**env, "RANK": str(rank)},
                                  stdout=open(logs[rank], "w"), stderr=subprocess.STDOUT) for rank in range(2)]
    codes = [process.wait(timeout=600) for process in processes]
    text = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n".join(t[-2000:] for t in text)
    assert smollm2_entry_made_by(cache) == "1"
    warnings = [line for t in text for line in t.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "incomplete (no manifest); rebuilding it" in warnings[0], warnings
    assert sorted(losses(out)) == [1]


def records_with_answers_of_very_different_lengths(path: Path) -> Path:
    """16 alpaca records whose answers run from 1 to ~60 words, short and long mixed."""
    words = "one two three four five six seven eight nine ten".split()
    lengths = [1, 60, 3, 45, 2, 30, 1, 55, 4, 20, 2, 50, 6, 12, 1, 40]
    lines = [json.dumps({"instruction": f"Count to {n} in words, question {i}.", "input": "",
                         "output": " ".join(words[j % 10] for j in range(n))}) for i, n in enumerate(lengths)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_two_ranks_give_the_single_process_step_with_doubled_accumulation(tmp_path):
    """The same 8 examples per optimizer step, split over 2 ZeRO-2 ranks x 2 micro-batches of 2, or 1 process (the
    plain engine) x 4 micro-batches of 2: the same logged losses and the same adapter after two steps, to rounding.
    Each step's loss is the mean over all of its learned tokens on both ranks (answers of 1 to 60 words: a mean of
    micro-batch or rank means would weigh them differently, and the two runs' micro-batches hold other examples)."""
    from safetensors.torch import load_file
    from launch.config import resolve
    from recipes import finetune

    data = records_with_answers_of_very_different_lengths(tmp_path / "answers.jsonl")
    common = ["--recipe", "llama_lora", f"data.train_files=[{data}]", "adapter.dropout=0.0", "train.max_steps=2",
              "train.micro_batch_size=2", "train.warmup_steps=0", "train.learning_rate=1e-3", "train.eval_every=0",
              "train.save_every=0", "train.export_peft=false", "train.tensorboard=false", *TINY_MODEL]
    two = tmp_path / "two_ranks"
    two.mkdir()
    process = launch(two, args=["launch/train.py", *common, "deepspeed.config=zero2",
                                "train.gradient_accumulation_steps=2"])
    assert process.returncode == 0, (tmp_path / "two_ranks.log").read_text()[-3000:]
    one = tmp_path / "one_process"
    finetune.run(resolve("llama_lora", common[2:] + ["train.gradient_accumulation_steps=4",
                                                     f"train.output_dir={one}"]))
    assert sorted(losses(two)) == [1, 2]
    for step in (1, 2):
        assert abs(losses(two)[step] - losses(one)[step]) < 1e-5, (losses(two), losses(one))
    adapter = "adapter/adapter_model.safetensors"
    single, sharded = load_file(str(one / adapter)), load_file(str(two / adapter))
    assert sorted(single) == sorted(sharded)
    for name in single:  # Adam moves each weight by about the lr (1e-3) per step: a different gradient shows
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-4, atol=1e-5)
