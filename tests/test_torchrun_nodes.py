"""Two torchrun "nodes" on this machine join one process group (c10d rendezvous on localhost, gloo, CPU).

Each launcher is a real `torchrun --nnodes 2 --nproc_per_node 1` process, as
it would run on each of two machines; its worker joins the group through
pipeline.distributed.init (what `pipeline train` calls) and all-gathers its
rank and node, so each side proves it saw the other.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = r'''
import json, os, torch, torch.distributed as tdist
from pipeline import distributed as dist

assert dist.init("cpu")  # gloo: the backend pipeline picks for a CPU run
mine = torch.tensor([dist.rank(), int(os.environ["GROUP_RANK"]), os.getpid()])
gathered = [torch.zeros(3, dtype=torch.long) for _ in range(dist.world_size())]
tdist.all_gather(gathered, mine)
print(json.dumps({"rank": dist.rank(), "world": dist.world_size(), "backend": tdist.get_backend(),
                  "seen": [t.tolist() for t in gathered]}), flush=True)
dist.shutdown()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two launchers and two workers importing torch (about 15 s on two cores)
def test_two_torchrun_nodes_join_one_group(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
              "--rdzv_backend", "c10d", "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "pipeline-test",
              "--max_restarts", "0", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    reports = []
    for node in nodes:
        out, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-2000:]
        reports += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1]  # one worker per node, each its own rank
    assert all(r["world"] == 2 and r["backend"] == "gloo" for r in reports)
    seen = reports[0]["seen"]
    assert reports[1]["seen"] == seen  # both saw the same group
    assert [s[0] for s in seen] == [0, 1] and sorted(s[1] for s in seen) == [0, 1]  # both nodes in it
    assert len({s[2] for s in seen}) == 2  # two processes, one per launcher
