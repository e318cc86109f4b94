"""recipes/shared_build.py under a real 2-process gloo group: one builder per node, the other ranks wait and read,
a builder's failure reaches every rank (no rank left waiting), and two builders sharing a folder (two nodes on one
file system) build it once, whichever takes the lock first."""
import json
import os
import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import free_port
from recipes.shared_build import MANIFEST, BuildFailed, build_once


def _worker(rank: int, port: int, local_ranks: list, scenario: str, target: str, results: str) -> None:
    os.environ.update(LOCAL_RANK=str(local_ranks[rank]), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    record = {"rank": rank}

    def build(folder: Path) -> None:
        if scenario == "fails":
            raise RuntimeError(f"disk full on rank {rank}")
        (folder / "weights.bin").write_bytes(b"x" * 100)
        (folder / "built_by").write_text(str(rank))

    if scenario.startswith("delay"):  # rank N reaches the folder late: the other builder takes the lock first
        time.sleep(3 if rank == int(scenario[-1]) else 0)
    try:
        folder = build_once(Path(target), build, what="a test folder", required=["weights.bin"])
        record["built_by"] = (folder / "built_by").read_text()
    except Exception as error:  # noqa: BLE001 - reported to the test
        record["error"] = f"{type(error).__name__}: {error}"
    Path(results, f"rank{rank}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def run_two(tmp_path, local_ranks, scenario) -> list[dict]:
    target, results = tmp_path / "cache" / "entry", tmp_path / scenario
    results.mkdir()
    mp.start_processes(_worker, args=(free_port(), local_ranks, scenario, str(target), str(results)), nprocs=2,
                       join=True, start_method="spawn")
    return [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]


def test_one_node_local_rank_0_builds_and_every_rank_reads(tmp_path):
    records = run_two(tmp_path, [0, 1], "plain")
    assert [r.get("built_by") for r in records] == ["0", "0"]
    manifest = json.loads((tmp_path / "cache" / "entry" / MANIFEST).read_text())
    assert manifest["files"] == {"built_by": 1, "weights.bin": 100}


@pytest.mark.parametrize("late_rank", [0, 1])
def test_two_nodes_sharing_a_folder_build_it_once(tmp_path, late_rank):
    """Both processes are local rank 0 (a node each); the one that is not late takes the lock and builds."""
    records = run_two(tmp_path, [0, 0], f"delay{late_rank}")
    assert [r.get("built_by") for r in records] == [str(1 - late_rank)] * 2


def test_a_failed_build_fails_every_rank_instead_of_leaving_them_waiting(tmp_path):
    started = time.monotonic()
    records = run_two(tmp_path, [0, 1], "fails")
    assert records[0]["error"] == "RuntimeError: disk full on rank 0"
    assert records[1]["error"].startswith("BuildFailed: a test folder could not be made in")
    assert time.monotonic() - started < 60 and not (tmp_path / "cache" / "entry").exists()


def test_a_single_process_build_with_a_missing_required_file_is_refused(tmp_path):
    with pytest.raises(BuildFailed, match="wrote no weights.bin"):
        build_once(tmp_path / "entry", lambda folder: (folder / "other").write_text(""), what="x",
                   required=["weights.bin"])
    assert not (tmp_path / "entry").exists()
