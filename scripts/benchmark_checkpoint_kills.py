"""Kill a process at random moments while it writes checkpoints, with TMPDIR on another file
system (a node-local /tmp beside a shared run directory): Lightning's default checkpoint IO
against vlmtrain's AtomicCheckpointIO, side by side.

For each IO, a child process saves the same checkpoint over and over to one path (as a
``last.ckpt`` is overwritten); the parent SIGKILLs it at a uniformly random moment after
its first save, then checks the path: does it still hold a whole checkpoint (every zip
entry's CRC, then a weights-only load)? What did the kill leave in TMPDIR and beside the
target? It also reports each IO's peak memory for one save.

    sudo python scripts/benchmark_checkpoint_kills.py --kills 30 --size-mb 256

As root it mounts two tmpfs; otherwise it uses /dev/shm for TMPDIR and --run-dir for runs
(they must be different file systems).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IOS = ("lightning", "vlmtrain")


def checkpoint(size_mb: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(0)
    n = size_mb * 2**20 // 4 // 8
    return {
        "state_dict": {f"layer{i}.weight": torch.randn(n, generator=g) for i in range(8)},
        "global_step": 1,
    }


def child(io_name: str, target: str, size_mb: int, once: bool) -> None:
    """Save forever (or once, printing the peak-memory increase in MB)."""
    if io_name == "lightning":
        from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO as IO
    else:
        from vlmtrain.checkpoints import AtomicCheckpointIO as IO
    io = IO()
    ckpt = checkpoint(size_mb)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    io.save_checkpoint(ckpt, target)
    if once:
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
        return
    print("saved", flush=True)  # the first save is whole: from now on, kill at random
    while True:
        io.save_checkpoint(ckpt, target)


def whole(path: Path) -> bool:
    from vlmtrain.checkpoints import DamagedCheckpoint, read_checkpoint

    if not path.is_file():
        return False
    try:
        read_checkpoint(path)
        return True
    except DamagedCheckpoint:
        return False


def files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


def trial(io_name: str, run_dir: Path, tmp_dir: Path, size_mb: int, rng: random.Random):
    target = run_dir / "checkpoints" / "last.ckpt"
    env = {**os.environ, "TMPDIR": str(tmp_dir), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", io_name, str(target), str(size_mb)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "saved":
        raise RuntimeError(f"{io_name} child exited with {proc.wait()}")
    time.sleep(rng.uniform(0, 2.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ok = whole(target)
    in_tmp = len(files(tmp_dir))
    beside = len([p for p in target.parent.iterdir() if p.name != target.name])
    for d in (run_dir, tmp_dir):  # the next trial starts clean
        for p in d.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return ok, in_tmp, beside


def two_file_systems(run_dir: Path) -> tuple[Path, Path, list[Path]]:
    base = Path(tempfile.mkdtemp(prefix="ckpt-kills-", dir=run_dir))
    runs, tmp = base / "runs", base / "tmp"
    runs.mkdir()
    tmp.mkdir()
    mounted = []
    if os.geteuid() == 0:
        for d in (runs, tmp):
            if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(d)]).returncode == 0:
                mounted.append(d)
    if len(mounted) < 2:
        tmp = Path(tempfile.mkdtemp(prefix="ckpt-kills-tmp-", dir="/dev/shm"))
    if runs.stat().st_dev == tmp.stat().st_dev:
        sys.exit("the run directory and TMPDIR are on one file system; pass another --run-dir")
    return runs, tmp, mounted


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        io_name, target, size_mb = sys.argv[2], sys.argv[3], int(sys.argv[4])
        child(io_name, target, size_mb, once=len(sys.argv) > 5)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--run-dir", type=Path, default=Path("."))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    runs, tmp, mounted = two_file_systems(args.run_dir.resolve())
    rng = random.Random(args.seed)
    try:
        print(f"{args.kills} kills per IO, {args.size_mb} MB checkpoint, TMPDIR on another fs")
        print(
            f"{'io':<10} {'whole after kill':>17} {'left in TMPDIR':>15} {'partial beside':>15} "
            f"{'peak mem of a save':>19}"
        )
        for io_name in IOS:
            results = [trial(io_name, runs, tmp, args.size_mb, rng) for _ in range(args.kills)]
            peak = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    io_name,
                    str(runs / "one.ckpt"),
                    str(args.size_mb),
                    "once",
                ],
                env={**os.environ, "TMPDIR": str(tmp)},
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            for p in (*runs.iterdir(), *tmp.iterdir()):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            print(
                f"{io_name:<10} {sum(r[0] for r in results):>11}/{len(results):<5} "
                f"{sum(r[1] for r in results):>15} {sum(r[2] for r in results):>15} "
                f"{float(peak):>15.0f} MB"
            )
    finally:
        for d in mounted:
            subprocess.run(["umount", str(d)])
        if tmp.parent == Path("/dev/shm"):
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
