"""See what a stage will train on before it trains: ``vlmtrain inspect-data [OVERRIDES]``.

For every dataset of each stage's mixture: a few samples rendered exactly as the model
sees them (chat template, expanded image tokens, truncation) with the supervised spans
marked, and, over a seeded subset, the token and image-token counts and the fraction of
samples ``stage.max_length`` cuts. Bad samples are reported with the encoder's own error
(the one training would raise), never skipped silently. ``plan=true`` prints the same
statistics when the data is present.
"""

from __future__ import annotations

import argparse
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vlmtrain.config import dataset_config
from vlmtrain.data.samples import DataError, load_samples

SUPERVISED = ("«", "»")  # around the tokens the loss is computed on


@dataclass
class DatasetReport:
    name: str
    path: str
    size: int
    examined: int = 0
    tokens: list[int] = field(default_factory=list)
    image_tokens: list[int] = field(default_factory=list)
    supervised: list[int] = field(default_factory=list)
    truncated: int = 0
    errors: list[str] = field(default_factory=list)
    rendered: list[str] = field(default_factory=list)

    @property
    def truncated_fraction(self) -> float:
        return self.truncated / self.examined if self.examined else 0.0

    def summary(self) -> dict[str, Any]:
        def stats(xs: list[int]) -> dict[str, float]:
            return {"mean": statistics.fmean(xs), "max": max(xs)} if xs else {}

        return {
            "dataset": self.name,
            "file": self.path,
            "samples": self.size,
            "examined": self.examined,
            "tokens": stats(self.tokens),
            "image_tokens": stats(self.image_tokens),
            "supervised_tokens": stats(self.supervised),
            "truncated_fraction": self.truncated_fraction,
            "errors": self.errors,
        }


def render(encoded: dict[str, Any], tokenizer, image_token_id: int) -> str:
    """The encoded ids as one line of text: supervised spans between « », image runs
    collapsed, newlines shown as \\n."""
    ids = encoded["input_ids"].tolist()
    supervised = (encoded["labels"] != -100).tolist()
    out, k = [], 0
    while k < len(ids):
        if ids[k] == image_token_id:
            j = k
            while j < len(ids) and ids[j] == image_token_id:
                j += 1
            out.append(f"<image x{j - k}>")
            k = j
            continue
        j = k
        while j < len(ids) and ids[j] != image_token_id and supervised[j] == supervised[k]:
            j += 1
        text = tokenizer.decode(ids[k:j], skip_special_tokens=False)
        out.append(f"{SUPERVISED[0]}{text}{SUPERVISED[1]}" if supervised[k] else text)
        k = j
    text = "".join(out).replace("\n", "\\n")  # one line per sample
    return text + (" [cut at max_length]" if encoded.get("truncated") else "")


def inspect_stage(
    cfg: DictConfig, encoder, *, show: int = 3, examine: int = 200, seed: int = 0
) -> list[DatasetReport]:
    """Reports for the datasets of ``cfg.stage``'s mixture (its ``train`` files)."""
    tokenizer = encoder.tokenizer
    reports = []
    for name, weight in cfg.stage.mixture.items():
        if weight <= 0:
            continue
        path = dataset_config(cfg.data, name).train
        samples = load_samples(path)
        report = DatasetReport(name, str(path), len(samples))
        order = list(range(len(samples)))
        random.Random(f"{seed}-{name}").shuffle(order)
        # The first samples of the file are shown; a seeded subset gives the statistics.
        picked = list(range(min(show, len(samples)))) + order[:examine]
        for k, index in enumerate(picked):
            try:
                encoded = encoder(samples[index])
            except DataError as e:
                report.errors.append(str(e))
                continue
            if k < show:
                report.rendered.append(
                    f"{encoded['id']}: " + render(encoded, tokenizer, encoder.image_token_id)
                )
                continue
            ids = encoded["input_ids"]
            report.examined += 1
            report.tokens.append(len(ids))
            report.image_tokens.append(int((ids == encoder.image_token_id).sum()))
            report.supervised.append(int((encoded["labels"] != -100).sum()))
            report.truncated += bool(encoded.get("truncated"))
        reports.append(report)
    return reports


def format_reports(stage: str, max_length: int, reports: list[DatasetReport]) -> str:
    lines = [f"stage {stage} (max_length {max_length})"]
    for r in reports:
        tok = r.summary()["tokens"]
        lines.append(
            f"  {r.name}: {r.size:,} samples in {r.path}; over {r.examined}: tokens mean "
            f"{tok.get('mean', 0):.0f} max {tok.get('max', 0)}, image tokens mean "
            f"{statistics.fmean(r.image_tokens) if r.image_tokens else 0:.0f}, supervised mean "
            f"{statistics.fmean(r.supervised) if r.supervised else 0:.0f}, cut at max_length "
            f"{100 * r.truncated_fraction:.1f}%"
        )
        lines += [f"    {text}" for text in r.rendered]
        lines += [f"    error: {e}" for e in r.errors[:5]]
        if len(r.errors) > 5:
            lines.append(f"    ... {len(r.errors) - 5} more errors")
    return "\n".join(lines)


def stage_encoder(cfg: DictConfig):
    """The stage's tokenizer and encoder, with the image-token count of its model (built on
    the meta device: no weights read)."""
    from vlmtrain.data.chat import check_chat_template
    from vlmtrain.model.lm import load_tokenizer
    from vlmtrain.model.vlm import VisionLanguageModel
    from vlmtrain.train import make_encoder

    tokenizer = load_tokenizer(cfg.model, cfg.data.chat_template)
    check_chat_template(tokenizer)
    model = VisionLanguageModel.build(cfg.model, tokenizer, device="meta")
    return make_encoder(cfg, model, tokenizer)


def data_present(cfg: DictConfig) -> bool:
    names = [n for n, w in cfg.stage.mixture.items() if w > 0]
    try:
        return all(Path(dataset_config(cfg.data, n).train).is_file() for n in names)
    except Exception:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="vlmtrain inspect-data",
        description="Rendered samples (supervised spans in « »), token counts and truncation "
        "of each dataset of a stage or recipe, before training. Other arguments are the "
        "same Hydra overrides training takes (recipe=tiny, stage=sft, data.root=...).",
    )
    p.add_argument("--show", type=int, default=3, help="samples rendered per dataset")
    p.add_argument("--examine", type=int, default=200, help="samples counted per dataset")
    args, overrides = p.parse_known_args(argv)

    from hydra import compose, initialize_config_dir

    from vlmtrain.cli import conf_dir
    from vlmtrain.recipe import stage_config, stage_list
    from vlmtrain.train import prepare_data

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    prepare_data(cfg)
    for name, stage in stage_list(cfg):
        scfg = stage_config(cfg, name, stage)
        reports = inspect_stage(scfg, stage_encoder(scfg), show=args.show, examine=args.examine)
        print(format_reports(name, scfg.stage.max_length, reports) + "\n")
    return 0
