"""The ``vlmtrain`` command.

``vlmtrain [hydra overrides]`` trains (Hydra app: ``--cfg job``, ``-m`` and all
overrides work); ``vlmtrain SUBCOMMAND ...`` runs one of ``SUBCOMMANDS``. vlmtrain's
own errors (a bad config value, a missing file, a refused resume) print as one message
without a traceback and exit 1; ``HYDRA_FULL_ERROR=1`` shows the traceback.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from vlmtrain.config import register_configs
from vlmtrain.requeue import requeue_on_signal
from vlmtrain.sweep import check_objective, objective, register_resolvers


def conf_dir() -> str:
    """The config tree: inside the package in an installed wheel, else the checkout's."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf")


CONF_DIR = conf_dir()

register_configs()
register_resolvers()

# Known-harmless noise from dependencies; everything else still shows.
for pattern in (
    ".*set_vital.*",
    ".*LeafSpec.*",
    ".*pre-optimization state.*",
    ".*litlogger.*",
    ".*Experiment logs directory.*",
    ".*Checkpoint directory .* exists and is not empty.*",  # a resumed stage's, by design
    ".*module\\(s\\) in eval mode at the start of training.*",  # frozen BatchNorm, by design
):
    warnings.filterwarnings("ignore", message=pattern)


def _quiet_lightning() -> None:
    """Lightning installs its own console handler; Hydra already logs to console and
    file, so without this every Lightning line shows twice."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def train_main(cfg: DictConfig) -> float | None:
    """Train (or plan) the configured run; the value of ``sweep.metric`` when it is set,
    for a Hydra sweeper (vlmtrain.sweep.objective)."""
    from vlmtrain.recipe import run_recipe

    _quiet_lightning()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with (
        _also_to_log(run_dir / f"{HydraConfig.get().job.name}.log"),
        _one_line_errors(),
        requeue_on_signal(cfg.trainer.requeue_signal),
    ):
        if cfg.plan:
            from vlmtrain.plan import plan_recipe

            plan_recipe(cfg, run_dir)
            return None
        check_objective(cfg)
        rows = run_recipe(cfg, run_dir)
        return objective(cfg, rows, run_dir)


# Errors whose message is the whole story: vlmtrain raises them with the key, file or
# sample involved and what to do. Anything else keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError, KeyError)


@contextlib.contextmanager
def _one_line_errors():
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        logging.getLogger("vlmtrain").debug("traceback", exc_info=True)  # the run's log file
        print(f"vlmtrain: error: {e}", file=sys.stderr)
        sys.exit(1)


class _Tee(io.TextIOBase):
    """stdout that also appends to the run's log file (without terminal colour codes)."""

    _ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
    # A live display (the progress bar) redraws itself with cursor moves and line erases:
    # the terminal shows it, the log keeps messages only.
    _REDRAW = re.compile(r"\x1b\[[0-9]*[AK]|\x1b\[\?25[hl]")

    def __init__(self, stream, log):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        if not self._REDRAW.search(text):
            self.log.write(self._ANSI.sub("", text))
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):
        return self.stream.encoding


@contextlib.contextmanager
def _also_to_log(path: Path):
    """vlmtrain's console messages (stage tables, summaries) go to the run's log file too."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as log:
        original = sys.stdout
        sys.stdout = _Tee(original, log)
        try:
            yield
        finally:
            sys.stdout = original


# name -> (module with main(argv), one line for --help)
SUBCOMMANDS = {
    "eval": ("vlmtrain.eval.cli", "score an artifact on held-out splits (eval.json, eval.md)"),
    "generate-shapes": ("vlmtrain.data.shapes", "write the shapes data set"),
    "inspect-data": (
        "vlmtrain.data.inspect",
        "rendered samples with supervised spans marked, token counts, truncation",
    ),
    "export": ("vlmtrain.export", "export an artifact to a transformers model directory"),
    "chat": ("vlmtrain.chat", "ask a trained model about an image of your own"),
}

USAGE = """usage: vlmtrain [OVERRIDES]              train a recipe (recipe=tiny) or one stage (stage=sft)
       vlmtrain -m [OVERRIDES]           sweep: key=a,b runs one job per value
       vlmtrain [OVERRIDES] plan=true    print the plan (stages, parameters, tokens, memory)
       vlmtrain [OVERRIDES] debug=smoke  every stage capped to a few steps, in runs/smoke
       vlmtrain [OVERRIDES] --cfg job    print the composed config
       vlmtrain SUBCOMMAND --help        a subcommand's options

subcommands:
{subcommands}

Re-running the same command resumes the run; see README.md. Config groups and the
full config follow (Hydra's help).
"""


def _recipe_stage_clash(args: list[str]) -> str | None:
    """``stage.x=...`` with ``recipe=...`` would fail deep in OmegaConf: say why instead."""
    recipe = next((a.split("=", 1)[1] for a in args if a.startswith("recipe=")), None)
    stage_keys = [a for a in args if a.lstrip("+~").startswith("stage.")]
    if recipe and recipe != "null" and stage_keys:
        key = stage_keys[0].lstrip("+~")
        return (
            f"{stage_keys[0]}: `stage.` sets the single stage of `stage=<name>` runs, but "
            f"recipe={recipe} runs named stages: write stages.<name>.{key[len('stage.') :]} "
            f"(`vlmtrain recipe={recipe} --cfg job` lists the stages)"
        )
    return None


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] in SUBCOMMANDS:
        import importlib

        module, _ = SUBCOMMANDS[args[0]]
        sys.exit(importlib.import_module(module).main(args[1:]))
    if args and args[0] in ("-h", "--help"):
        width = max(map(len, SUBCOMMANDS))
        lines = [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
        print(USAGE.format(subcommands="\n".join(lines)))
    elif clash := _recipe_stage_clash(args):
        print(f"vlmtrain: error: {clash}", file=sys.stderr)
        sys.exit(2)
    train_main()


if __name__ == "__main__":
    main()
