"""launch/train.py in a process whose DeepSpeed skips the stream synchronisation of a one-rank fetch: for
bench/zero3_one_rank_sync.py only (a diagnosis). Same arguments as launch/train.py.

DeepSpeed 0.19.8's ``NoGatherCoalescedHandle.wait`` synchronises the current stream before it marks the weights of
a one-rank partition available; here it only marks them (the weights were already on the device: no copy to wait
for). With ``offload_param`` the fetch is a host-to-device copy, and this is not safe to use.
"""
import runpy
import sys
from pathlib import Path

from deepspeed.runtime.zero import partition_parameters
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

Handle = partition_parameters.NoGatherCoalescedHandle


def wait_without_sync(self, **kwargs) -> None:
    if self._NoGatherCoalescedHandle__complete:
        return
    for param in self._NoGatherCoalescedHandle__params:
        param.ds_status = ZeroParamStatus.AVAILABLE
    self._NoGatherCoalescedHandle__complete = True


def skip_one_rank_sync() -> None:
    Handle.wait = wait_without_sync


if __name__ == "__main__":
    skip_one_rank_sync()
    sys.argv = [str(Path(__file__).resolve().parents[1] / "launch" / "train.py"), *sys.argv[1:]]  # it finds its root
    runpy.run_path(sys.argv[0], run_name="__main__")
