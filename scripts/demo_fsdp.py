"""trainer=fsdp (2 CPU processes, FSDP2 over gloo) against one plain process, on the
shapes world, side by side: the same global batch, so the same steps. Prints the largest
loss difference over the steps, the largest difference over the artifacts' tensors, the
wall time of each and the peak resident memory of one process (rank 0).

    python scripts/demo_fsdp.py --steps 30 --out /tmp/demo_fsdp

What to expect on CPU: equal losses within float rounding (the ranks sum in another
order) and a slower FSDP run: gathers over gloo and two processes sharing the cores buy
nothing for a model of a few hundred thousand parameters. FSDP is for models whose
weights, gradients and optimizer state do not fit one device; `vlmtrain plan` with
trainer.strategy=fsdp shows the per-device memory it buys there.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from safetensors.torch import load_file
from side_by_side import launch, wait

from vlmtrain.config import COMPONENTS


def losses(run: Path) -> dict[int, float]:
    with (run / "sft" / "logs" / "csv" / "metrics.csv").open() as f:
        return {
            int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("/tmp/demo_fsdp"))
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = [
        f"output_dir={out}",
        f"data.root={out / 'shapes'}",
        "stage=sft",
        f"stage.max_steps={args.steps}",
        "stage.batch_size=4",
        "stage.global_batch_size=16",
        "stage.trainable.vision=true",
        "+stage.mixture.text=0.5",
        "trainer.progress_bar=false",
        "trainer.num_threads=1",
        "trainer.checkpoint_every=10",
    ]
    launch("prepare", ["stage.max_steps=1"], common, out).wait()
    procs = {
        "single": launch("single", ["trainer=cpu"], common, out),
        "fsdp": launch(
            "fsdp", ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"], common, out
        ),
    }
    wait(procs, out)
    a, b = losses(out / "single"), losses(out / "fsdp")
    worst = max(abs(a[s] - b[s]) for s in a)
    tensors = 0.0
    for name in COMPONENTS:
        x = load_file(out / "single/sft/artifact" / f"{name}.safetensors")
        y = load_file(out / "fsdp/sft/artifact" / f"{name}.safetensors")
        assert x.keys() == y.keys() and all(x[k].shape == y[k].shape for k in x)
        tensors = max([tensors, *((x[k] - y[k]).abs().max().item() for k in x)])
    rows = {}
    for run in ("single", "fsdp"):
        m = json.loads((out / run / "sft/artifact/manifest.json").read_text())["metrics"]
        rows[run] = (m["wall_time_s"], m["peak_rss_mb"], m["train/loss"])
    print(f"steps {len(a)}; max |loss difference| {worst:.3g}; artifact max |diff| {tensors:.3g}")
    for run, (t, rss, loss) in rows.items():
        print(f"  {run:7s} wall {t:6.1f} s  peak RSS (rank 0) {rss:6.0f} MB  final loss {loss:.4f}")


if __name__ == "__main__":
    main()
