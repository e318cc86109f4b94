"""selora under real multi-process DeepSpeed (CPU, gloo): ZeRO-2 and ZeRO-3 on 2 ranks with every parameter
partitioned (stage3_param_persistence_threshold 0) must reproduce the single-process run, and so must ZeRO-3 on
4 ranks, where the sharded SVD scheduler has 4 owners and each weight must be made whole on its owner only.

One launch for both stages on 2 ranks and one for 4 ranks, each running all its methods (a launch costs 15-45 s
on CPU; 4 ranks about 60 s), through torchrun (DeepSpeed's own launcher adds two more DeepSpeed-importing processes
before the ranks start; the ranks' DeepSpeed is the same).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import torchrun

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "workers" / "zero_library_worker.py"
METHODS = ("lora", "selora_pissa", "selora_srlora")
SVD_METHODS = ("selora_pissa", "selora_srlora")  # PiSSA init and SRLoRA's directions: the two sharded SVD users
FOUR = "zero3_4ranks"
# fp32 on CPU: a data-parallel all-reduce sums in another order than one process does; measured <= 1e-6.
LOSS_TOLERANCE = 1e-5
ADAPTER_TOLERANCE = 1e-5

pytestmark = pytest.mark.multiprocess


def tiny_model(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128)).save_pretrained(path)
    return path


def launch_ranks(args: list[str], log: Path, processes: int = 2, timeout: int = 600) -> None:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = torchrun(processes) + args
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout)
    assert result.returncode == 0, f"{processes}-rank run failed, see {log}:\n" + log.read_text()[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("zero")
    model = tiny_model(base / "model")
    single = base / "single"
    subprocess.run([sys.executable, str(WORKER), "--model", str(model), "--out", str(single)], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"), capture_output=True)
    outputs = {"single": single}
    launch_ranks([str(WORKER), "--model", str(model), "--out", str(base), "--stages", "2,3"],
                 base / "two_ranks.log")  # ZeRO-2, then ZeRO-3, in the same two processes
    outputs.update({stage: base / f"zero{stage}" for stage in (2, 3)})
    launch_ranks([str(WORKER), "--model", str(model), "--out", str(base / FOUR), "--stages", "3",
                  "--methods", ",".join(SVD_METHODS)], base / f"{FOUR}.log", processes=4)
    outputs[FOUR] = base / FOUR / "zero3"
    return outputs


def result(directory: Path, method: str) -> dict:
    return json.loads((directory / f"{method}.json").read_text())


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_two_ranks_reproduce_single_process_losses(runs, stage, method):
    single, sharded = result(runs["single"], method), result(runs[stage], method)
    assert len(sharded["losses"]) == len(single["losses"]) == 5
    diffs = [abs(a - b) for a, b in zip(single["losses"], sharded["losses"])]
    assert max(diffs) < LOSS_TOLERANCE, (method, stage, single["losses"], sharded["losses"])
    assert sharded["events"] == single["events"]  # SRLoRA: the same pairs fused at the same steps


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_matches_single_process(runs, stage, method):
    single = load_file(str(runs["single"] / f"{method}_adapter" / "adapter_model.safetensors"))
    sharded = load_file(str(runs[stage] / f"{method}_adapter" / "adapter_model.safetensors"))
    assert single.keys() == sharded.keys()
    for key in single:
        assert single[key].shape == sharded[key].shape, key
        assert torch.allclose(single[key], sharded[key], atol=ADAPTER_TOLERANCE, rtol=0), key
    meta_single = json.loads((runs["single"] / f"{method}_adapter" / "adapter_config.json").read_text())
    meta_sharded = json.loads((runs[stage] / f"{method}_adapter" / "adapter_config.json").read_text())
    assert meta_single == meta_sharded


def test_sharded_pissa_init_equals_single_process_and_splits_the_work(runs):
    single = load_file(str(runs["single"] / "selora_pissa_init_adapter" / "adapter_model.safetensors"))
    sharded = load_file(str(runs[3] / "selora_pissa_init_adapter" / "adapter_model.safetensors"))
    for key in single:
        assert torch.allclose(single[key], sharded[key], atol=1e-6, rtol=0), key
    residual_single = torch.load(runs["single"] / "selora_pissa_init_q_proj_base.pt")
    residual_sharded = torch.load(runs[3] / "selora_pissa_init_q_proj_base.pt")
    assert torch.allclose(residual_single, residual_sharded, atol=1e-6, rtol=0)
    # 14 projection layers, all the same shape: each rank computed exactly half of the SVDs.
    assert result(runs[3], "selora_pissa")["svd_computed_per_rank"] == [7.0, 7.0]
    assert result(runs["single"], "selora_pissa")["svd_computed_per_rank"] == [14.0]


@pytest.mark.parametrize("method", SVD_METHODS)
def test_four_ranks_reproduce_single_process(runs, method):
    single, sharded = result(runs["single"], method), result(runs[FOUR], method)
    assert max(abs(a - b) for a, b in zip(single["losses"], sharded["losses"])) < LOSS_TOLERANCE
    assert sharded["events"] == single["events"]
    for name in (f"{method}_init_adapter", f"{method}_adapter"):
        expected = load_file(str(runs["single"] / name / "adapter_model.safetensors"))
        got = load_file(str(runs[FOUR] / name / "adapter_model.safetensors"))
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.allclose(expected[key], got[key], atol=ADAPTER_TOLERANCE, rtol=0), (name, key)
    residual_single = torch.load(runs["single"] / f"{method}_init_q_proj_base.pt")
    residual_sharded = torch.load(runs[FOUR] / f"{method}_init_q_proj_base.pt")
    assert torch.allclose(residual_single, residual_sharded, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_four_owners_each_weight_made_whole_on_its_owner_only(runs, method):
    """The SVD scheduler spreads the 14 projections over all 4 ranks; during the SVDs each base weight is made
    whole exactly once, on its owner, by a gather every rank takes part in, and never on every rank."""
    owners = result(runs[FOUR], method)["svd_owners"]
    records = [r for rank in range(4)
               for r in json.loads((runs[FOUR] / f"{method}_svd_gathers_rank{rank}.json").read_text())]
    assert len(owners) == 14 and set(owners.values()) == {0, 1, 2, 3}
    assert [r for r in records if r["via"] != "gather_to_owner"] == []
    assert {r["weight"] for r in records} == {f"{layer}.base_layer.weight" for layer in owners}
    for layer, owner in owners.items():
        calls = [r for r in records if r["weight"] == f"{layer}.base_layer.weight"]
        assert sorted(r["rank"] for r in calls) == [0, 1, 2, 3], layer
        assert {r["owner"] for r in calls} == {owner}, layer
        assert [r["rank"] for r in calls if r["whole_here"]] == [owner], layer
    computed = result(runs[FOUR], method)["svd_computed_per_rank"]
    assert computed == [float(list(owners.values()).count(rank)) for rank in range(4)]
