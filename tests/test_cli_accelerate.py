"""A scan split by ``accelerate launch`` over two processes writes the bytes a one-process scan writes.

The model overflows in its residual stream, so the merge covers the stream records, the stream
span and the plan's reasons too.

Both sides run one torch thread per process: CPU kernels may sum in another order with another
thread count, which moves a float32 absmax by an ulp, and the comparison is byte for byte.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from guarded_diffusers.cli.main import main

SCAN = [
    "--samples",
    "3",
    "--max-size",
    "16",
    "--max-steps",
    "2",
    "--max-sequence-length",
    "32",
    "--device",
    "cpu",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_merge_to_the_one_process_report(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, saved_model: Callable[..., tuple[Path, str | None]]
) -> None:
    folder, injected = saved_model("double_block_ff_residual")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["scan", str(folder), "--out", str(tmp_path / "one"), *SCAN]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    # accelerate 1.x starts CPU workers through torchrun only with --multi_gpu (--cpu alone needs
    # mpirun); --device cpu makes each worker a gloo CPU process, with or without a GPU present.
    launch = [
        Path(sys.executable).with_name("accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    command = [*launch, "-m", "guarded_diffusers.cli", "scan", folder, "--out", tmp_path / "two", *SCAN]
    result = subprocess.run(
        [str(part) for part in command],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    assert result.stdout.count("wrote ") == 1  # only the main process writes and prints
    for name in ("report.json", "plan.json"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert injected in report["at_risk"] and report["stream"]["spans"]
    assert report["stream"]["blocks"][0]["calls"] > 0
