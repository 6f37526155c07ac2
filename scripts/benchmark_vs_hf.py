"""vlmtrain's SFT stage against transformers' ``Trainer`` and a bare PyTorch loop, side by side.

    python scripts/benchmark_vs_hf.py [--sizes tiny,larger] [--threads 1] [--rounds 3]
                                      [--steps 8] [--packing] [overrides...]

The same SFT step batches of the tiny recipe's mixture (VQA, captions, chats) are
encoded once; the same weights run as vlmtrain's ``VisionLanguageModel`` and, copied
by ``vlmtrain.export.build_llava``, as transformers' ``LlavaForConditionalGeneration``
(patch stem, so the tower is Llava-exportable; fp32). Three runners train on them:

- ``vlmtrain``: the stage's own Lightning trainer and ``NextTokenModule``
  (``vlmtrain.train.build_trainer``: its callbacks, logger, data-quality counting);
- ``trainer``: transformers' ``Trainer`` on the Llava copy (constant lr, no shuffling);
- ``bare``: a plain loop on the Llava copy (forward with labels, backward, clip, AdamW).

Step 1's loss of all three is asserted equal (1e-5 relative); then, in interleaved
rounds, each runner trains ``--warmup`` + ``--steps`` steps from the same weights and
its supervised tokens per second over the timed steps is recorded. Medians over rounds
and ratios to the ``Trainer`` are printed, ending with one summary line.

``--clock cpu`` (the default) times steps by the process's CPU time: with one torch
thread on an idle core that is the wall time, and on a machine shared with other jobs
it still measures the work each runner does rather than how often it got the core.
``--clock wall`` uses the wall clock (use it on a dedicated machine with more threads).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

from vlmtrain.config import register_configs
from vlmtrain.data.module import StageDataModule
from vlmtrain.export import build_llava
from vlmtrain.objectives.next_token import NextTokenModule
from vlmtrain.train import build_model, build_trainer, make_encoder, prepare_data, resolve_init

CONF = Path(__file__).resolve().parents[1] / "conf"
# The tiny recipe's SFT stage, everything training, with a Llava-exportable patch stem and
# the per-token mean loss Llava computes.
STAGE = [
    "stage=sft",
    "stage.trainable.vision=true",
    "+stage.mixture.vqa=0.6",
    "+stage.mixture.caption=0.2",
    "stage.mixture.instruct=0.2",
    "stage.batch_size=32",
    "stage.loss_reduction=token",
    "stage.val_every=0",
    "stage.optim.warmup_ratio=0.0",
    "model.vision.stem=patch",
    "trainer.progress_bar=false",
    "trainer.checkpoint_every=1000000",
    "trainer.log_every=1000000",
]
SIZES = {
    "tiny": [],
    # LM 256 wide x 4 layers, tower 128 wide x 4 layers (MLPs twice as wide, as in tiny).
    "larger": [
        "model.lm.hidden_size=256",
        "model.lm.intermediate_size=512",
        "model.lm.num_hidden_layers=4",
        "model.vision.hidden_size=128",
        "model.vision.intermediate_size=256",
        "model.vision.num_hidden_layers=4",
    ],
}


def supervised_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def llava_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "labels")}


class StepClock(Callback):
    """perf_counter at the end of every step, and step 1's loss (Lightning runner)."""

    def __init__(self):
        self.ends: list[float] = []
        self.first_loss: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.first_loss is None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.first_loss = float(loss)
        self.ends.append(clock_now())


CLOCK = {"cpu": time.process_time, "wall": time.perf_counter}
clock_now = time.process_time  # set from --clock


def timed(ends: list[float], warmup: int) -> float:
    """Seconds of the steps after the first ``warmup`` ones."""
    return ends[-1] - ends[warmup - 1]


def run_vlmtrain(cfg, model, batches, warmup: int, tmp: Path) -> tuple[float, float]:
    model = copy.deepcopy(model)
    if cfg.trainer.get("compile"):  # as vlmtrain.train.run_stage does
        model.compile()
    module = NextTokenModule(model, cfg.stage)
    clock = StepClock()
    trainer = build_trainer(cfg, tmp / "vlmtrain", fresh_start=True)
    trainer.callbacks.append(clock)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)
    trainer.fit(module, train_dataloaders=loader)
    return clock.first_loss, timed(clock.ends, warmup)


def run_hf_trainer(cfg, llava, batches, warmup: int, tmp: Path) -> tuple[float, float]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Batches(torch.utils.data.IterableDataset):  # iterable: the Trainer never shuffles it
        def __iter__(self):
            return iter(llava_inputs(b) for b in batches)

    class Clock(TrainerCallback):
        ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(clock_now())

    class FirstLoss(Trainer):
        first: float | None = None

        def compute_loss(self, model, inputs, *args, **kwargs):
            loss = super().compute_loss(model, inputs, *args, **kwargs)
            if self.first is None:
                self.first = float((loss[0] if isinstance(loss, tuple) else loss).detach())
            return loss

    optim = cfg.stage.optim
    args = TrainingArguments(
        output_dir=str(tmp / "hf"),
        max_steps=len(batches),
        per_device_train_batch_size=1,  # one item of the data set is one step batch
        learning_rate=optim.lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.betas[0],
        adam_beta2=optim.betas[1],
        max_grad_norm=optim.grad_clip,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        seed=cfg.seed,
    )
    clock = Clock()
    clock.ends = []
    trainer = FirstLoss(
        model=copy.deepcopy(llava),
        args=args,
        train_dataset=Batches(),
        data_collator=lambda items: items[0],
        callbacks=[clock],
    )
    trainer.train()
    return trainer.first, timed(clock.ends, warmup)


def run_bare(cfg, llava, batches, warmup: int, tmp: Path) -> tuple[float, float]:
    model = copy.deepcopy(llava).train()
    optim = cfg.stage.optim
    opt = torch.optim.AdamW(
        model.parameters(), lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay
    )
    ends, first = [], None
    for batch in batches:
        loss = model(**llava_inputs(batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        first = float(loss) if first is None else first
        ends.append(clock_now())
    return first, timed(ends, warmup)


RUNNERS = {"vlmtrain": run_vlmtrain, "trainer": run_hf_trainer, "bare": run_bare}


def step_batches(cfg, model, tokenizer, n: int) -> list[dict]:
    """The first ``n`` step batches of the stage's own loader, encoded once."""
    dm = StageDataModule(cfg.data, cfg.stage, make_encoder(cfg, model, tokenizer), cfg.seed)
    dm.setup("fit")
    out = []
    for batch in dm.train_dataloader():
        out.append(batch)
        if len(out) == n:
            return out
    raise ValueError(f"the mixture has fewer than {n} step batches")


def bench_size(name: str, args, overrides: list[str]) -> dict:
    register_configs()
    n = args.warmup + args.steps
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", [*STAGE, *SIZES[name], *overrides, f"stage.max_steps={n}"])
    if args.packing:
        if "packing" not in cfg.stage:
            raise SystemExit("--packing: this vlmtrain has no stage.packing yet")
    prepare_data(cfg)
    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, model = build_model(cfg, resolve_init(cfg.stage, cfg.model, Path(tmp)))
    model.vision_tower.requires_grad_(True)
    batches = step_batches(cfg, model, tokenizer, n)
    tokens = sum(supervised_tokens(b) for b in batches[args.warmup :])
    cells = sum(b["attention_mask"].numel() for b in batches)
    padding = 1 - sum(int(b["attention_mask"].sum()) for b in batches) / cells
    vlm_batches, vlm_tokens, vlm_cfg = batches, tokens, cfg
    if args.packing:  # vlmtrain's runner reads the same samples packed (its own loader)
        with initialize_config_dir(str(CONF), version_base=None):
            vlm_cfg = compose(
                "config",
                [*STAGE, *SIZES[name], *overrides, f"stage.max_steps={n}", "stage.packing=true"],
            )
        vlm_batches = step_batches(vlm_cfg, model, tokenizer, n)
        vlm_tokens = sum(supervised_tokens(b) for b in vlm_batches[args.warmup :])
    llava = build_llava(model, tokenizer, cfg.model).train()

    rates: dict[str, list[float]] = {r: [] for r in RUNNERS}
    first: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = list(RUNNERS) if rnd % 2 == 0 else list(RUNNERS)[::-1]
            for runner in order:
                if runner == "vlmtrain":
                    loss, seconds = run_vlmtrain(
                        vlm_cfg, model, vlm_batches, args.warmup, Path(tmp)
                    )
                    rates[runner].append(vlm_tokens / seconds)
                else:
                    loss, seconds = RUNNERS[runner](cfg, llava, batches, args.warmup, Path(tmp))
                    rates[runner].append(tokens / seconds)
                first.setdefault(runner, loss)
    if not args.packing:
        ref = first["trainer"]
        for runner, loss in first.items():
            if abs(loss - ref) > 1e-5 * abs(ref):
                raise AssertionError(f"{name}: step-1 loss of {runner} {loss:.7f} != {ref:.7f}")
    med = {r: statistics.median(v) for r, v in rates.items()}
    return {"size": name, "median": med, "rates": rates, "first": first, "padding": padding}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="tiny,larger")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one process)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--packing", action="store_true", help="vlmtrain with stage.packing")
    parser.add_argument("--clock", choices=sorted(CLOCK), default="cpu", help="see above")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides (all sizes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global clock_now
    clock_now = CLOCK[args.clock]

    results = [bench_size(s, args, args.overrides) for s in args.sizes.split(",")]
    print("| size | runner | supervised tokens/s (median) | rounds | vs Trainer | step-1 loss |")
    print("|---|---|---:|---|---:|---:|")
    for res in results:
        med = res["median"]
        for runner, rate in med.items():
            rounds = " ".join(f"{r:.0f}" for r in res["rates"][runner])
            print(
                f"| {res['size']} | {runner} | {rate:.0f} | {rounds} | "
                f"{rate / med['trainer']:.2f}x | {res['first'][runner]:.6f} |"
            )
    summary = "; ".join(
        f"{r['size']}: vlmtrain {r['median']['vlmtrain']:.0f} tok/s = "
        f"{r['median']['vlmtrain'] / r['median']['trainer']:.2f}x Trainer, "
        f"{r['median']['vlmtrain'] / r['median']['bare']:.2f}x bare loop "
        f"(padding {r['padding']:.0%})"
        for r in results
    )
    print(
        f"benchmark_vs_hf: {summary}; fp32, {args.threads} thread(s), {args.clock} clock, "
        f"{args.rounds} rounds x {args.steps} steps" + (", packing" if args.packing else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
