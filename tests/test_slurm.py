"""launch/slurm: node-list expansion, hostfile, launch commands, the sbatch script with stubs, and the sbatch
script for real on two local "nodes" (a stand-in srun), with a node killed and the job requeued."""
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from launch.slurm import hostfile as hf

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("nodelist, expected", [
    ("node7", ["node7"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("gpu[01-02],login5", ["gpu01", "gpu02", "login5"]),
    ("a[1-2]-ib,b[009-010]", ["a1-ib", "a2-ib", "b009", "b010"]),
    ("x[8]", ["x8"]),
])
def test_expand_nodelist(nodelist, expected):
    assert hf.expand_nodelist(nodelist) == expected


@pytest.mark.parametrize("nodelist, message", [
    ("gpu[01-03", "unmatched '\\['"), ("gpu01]", "unmatched '\\]'"), ("gpu[3-1]", "range '3-1'"),
    ("gpu[a-b]", "range 'a-b'"), ("", "empty"),
])
def test_malformed_nodelists_are_named(nodelist, message):
    with pytest.raises(hf.SlurmEnvError, match=message):
        hf.expand_nodelist(nodelist)


def test_hostfile_and_commands(tmp_path, capsys):
    env = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "42"}
    path = tmp_path / "hosts"
    assert hf.main(["--launcher", "deepspeed", "--hostfile", str(path), "--port", "6000", "--", "--recipe", "r",
                    "a=1"], env=env) == 0
    assert path.read_text() == "gpu01 slots=4\ngpu02 slots=4\n"
    assert capsys.readouterr().out.strip() == (
        f"deepspeed --hostfile {path} --master_addr gpu01 --master_port 6000 --num_nodes 2 --num_gpus 4 "
        "launch/train.py --recipe r a=1")
    assert hf.main(["--", "--recipe", "r"], env={**env, "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "h100:8"}) == 0
    assert capsys.readouterr().out.strip() == ("torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d "
                                               "--rdzv_endpoint gpu01:29500 --rdzv_id 42 launch/train.py --recipe r")


def test_missing_variables_give_one_line_errors(capsys):
    assert hf.main(["--", "--recipe", "r"], env={}) == 2
    assert "SLURM_JOB_NODELIST is not set" in capsys.readouterr().err
    assert hf.main(["--", "--recipe", "r"], env={"SLURM_JOB_NODELIST": "n1"}) == 2
    assert "--gpus-per-node" in capsys.readouterr().err
    assert hf.main(["--", "--recipe", "r"], env={"SLURM_JOB_NODELIST": "n1", "SLURM_GPUS_ON_NODE": "lots"}) == 2
    assert "SLURM_GPUS_ON_NODE='lots'" in capsys.readouterr().err


def test_sbatch_syntax_and_one_line_node_count():
    script = (ROOT / "launch" / "slurm" / "train.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "launch" / "slurm" / "train.sbatch")]).returncode == 0
    assert sum(line.startswith("#SBATCH --nodes=") for line in script.splitlines()) == 1


@pytest.mark.parametrize("launcher, stub", [("torchrun", "srun"), ("deepspeed", "deepspeed")])
def test_sbatch_runs_the_launch_command_in_a_fake_allocation(tmp_path, launcher, stub):
    """Run train.sbatch for real with srun/deepspeed replaced by stubs that record their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "called"
    for name in ("srun", "deepspeed", "scontrol"):
        body = f'echo "{name} $*" >> {record}\n' if name != "scontrol" else "exit 1\n"
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_GPUS_ON_NODE": "2", "SLURM_JOB_ID": "9",
           "SLURM_SUBMIT_DIR": str(tmp_path), "LAUNCHER": launcher, "RECIPE": "qlora_selora"}
    (tmp_path / "launch").symlink_to(ROOT / "launch")
    result = subprocess.run(["bash", str(ROOT / "launch" / "slurm" / "train.sbatch"), "train.max_steps=5"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    called = record.read_text()
    assert called.startswith(f"{stub} ")
    assert "--recipe qlora_selora deepspeed.config=zero3 train.resume=auto train.max_steps=5" in called
    if launcher == "torchrun":
        assert "--kill-on-bad-exit=1 bash -c torchrun --nnodes 2 --nproc_per_node 2" in called
        assert "--rdzv_endpoint node1:29500 --rdzv_id 9" in called
    else:
        assert "--hostfile hostfile-9 --master_addr node1" in called
        assert (tmp_path / "hostfile-9").read_text() == "node1 slots=2\nnode2 slots=2\n"


def test_rendezvous_host_override(capsys):
    env = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_ID": "42"}
    assert hf.main(["--rdzv-host", "10.0.0.7", "--", "--recipe", "r"], env=env) == 0
    assert "--rdzv_endpoint 10.0.0.7:29500 --rdzv_id 42" in capsys.readouterr().out


# ----- the sbatch script end to end: 2 "nodes" on this machine, a node killed, the job requeued -------------------
TWO_NODE_STEPS = 10
TWO_NODE_ARGS = ["model.preset=tiny_llama", f"train.max_steps={TWO_NODE_STEPS}", "train.save_every=2",
                 "train.eval_every=0", "train.warmup_steps=1", "train.learning_rate=3e-3", "data.max_train_records=200",
                 "deepspeed.overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"]


def sbatch(tmp_path: Path, job_id: str, output_dir: Path, background: bool = False, restarts: int = 0):
    """train.sbatch as SLURM would run it on a 2-node allocation (1 task per node), with tests/fake_slurm/srun
    starting each node as a local process group; the nodes meet through torchrun's c10d rendezvous on
    127.0.0.1 and train with ZeRO-3 over gloo on the CPU."""
    (tmp_path / "launch").is_symlink() or (tmp_path / "launch").symlink_to(ROOT / "launch")
    (tmp_path / "pids").mkdir(exist_ok=True)
    env = {**os.environ, "PATH": f"{ROOT / 'tests' / 'fake_slurm'}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_ID": job_id, "SLURM_RESTART_COUNT": str(restarts),
           "SLURM_SUBMIT_DIR": str(tmp_path), "SRUN_PID_DIR": str(tmp_path / "pids"),
           "RDZV_HOST": "127.0.0.1", "PORT": str(29300 + os.getpid() % 200), "RECIPE": "llama_selora"}
    log = open(tmp_path / f"{output_dir.name}.log", "a")
    process = subprocess.Popen(["bash", str(ROOT / "launch" / "slurm" / "train.sbatch"), *TWO_NODE_ARGS,
                                f"train.output_dir={output_dir}"], cwd=tmp_path, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    if not background:
        process.wait(timeout=600)
    return process


@pytest.mark.multiprocess
def test_two_node_sbatch_killed_node_requeued_resumes_exactly(tmp_path):
    from test_recipe_multiprocess import last_step, losses

    straight = tmp_path / "straight"
    assert sbatch(tmp_path, "100", straight).returncode == 0, (tmp_path / "straight.log").read_text()[-3000:]
    assert sorted(losses(straight)) == list(range(1, TWO_NODE_STEPS + 1))

    requeued = tmp_path / "requeued"
    process = sbatch(tmp_path, "101", requeued, background=True)
    deadline = time.time() + 600
    while last_step(requeued) < 5 and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    node = int((tmp_path / "pids" / "node-1.pid").read_text())
    os.killpg(node, signal.SIGKILL)  # node 2 of the allocation dies: its torchrun agent and its rank
    assert process.wait(timeout=120) != 0  # srun --kill-on-bad-exit ends the step; the job fails
    assert 5 <= last_step(requeued) < TWO_NODE_STEPS
    checkpoint = (requeued / "checkpoints" / "latest").read_text().strip()
    assert checkpoint in {f"step_{n}" for n in range(2, TWO_NODE_STEPS, 2)}

    # SLURM requeues the job: same job id, same script and output directory; train.resume=auto continues it
    log = tmp_path / "requeued.log"
    killed_part = len(log.read_text())
    assert sbatch(tmp_path, "101", requeued, restarts=1).returncode == 0, log.read_text()[-3000:]
    assert f"resumed from {requeued / 'checkpoints' / checkpoint}" in log.read_text()[killed_part:]
    assert losses(requeued) == losses(straight)
