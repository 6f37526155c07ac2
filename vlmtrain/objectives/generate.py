"""objective=generate: a stage that writes a data set instead of training.

Each step samples ``stage.generate.num_samples`` completions of its prompts from the
stage's (frozen) model, scores them by consistency (``consistency.py``) and keeps the
scored rows; the stage covers ``max_steps x batch_size x accumulate`` prompts of its
mixture. When it ends it writes, in ``<stage dir>/data/``:

- ``samples.jsonl``: every prompt with its samples, their scores, best and worst;
- ``sft.jsonl``: the prompt with its best sample (LLaVA records, for next_token), for
  the prompts whose best sample's score reaches ``min_consistency``;
- ``pref.jsonl``: best as chosen, worst as rejected, where they differ (for preference);
- ``fingerprint.json``: each file's sha256 and row count.

A later stage names them as data, ``data.datasets.<name>.train=from:<stage>/sft.jsonl``
(``vlmtrain.data.stage_data``). The rows are kept in every checkpoint and sampling is
seeded by (seed, step, rank), so a killed stage resumes to the same files. The stage's
artifact holds its model unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from vlmtrain.checkpoints import world_size_of
from vlmtrain.data.prompts import PromptDataModule, prompt_micro_batches
from vlmtrain.objectives.common import StageModule
from vlmtrain.objectives.consistency import (
    mbr_scores,
    pair_record,
    scored_record,
    sft_record,
    similarity_for,
)
from vlmtrain.objectives.grpo import sampling_seed
from vlmtrain.objectives.registry import Objective
from vlmtrain.objectives.rollout import kv_cache_bytes, sample_completions

FILES = ("samples.jsonl", "sft.jsonl", "pref.jsonl")


class GenerateModule(StageModule):
    def __init__(self, model, stage, tokenizer, seed: int, stage_dir: Path, raw_prompts):
        super().__init__(model, stage)
        self.cfg = stage.generate
        self.tokenizer, self.seed, self.stage_dir = tokenizer, seed, Path(stage_dir)
        self.similarity = similarity_for(self.cfg.similarity, self.cfg.answer_marker)
        self.raw_prompts = raw_prompts  # (dataset, id) -> the prompt's source record fields
        self.rows: dict[str, dict] = {}
        # Lightning counts steps by optimizer steps: a learning-rate-0 step over a lone
        # scalar that no model weight depends on advances it.
        self._clock = torch.nn.Parameter(torch.zeros(()))

    def configure_optimizers(self):
        return torch.optim.SGD([self._clock], lr=0.0)

    def training_step(self, batch: dict, batch_idx: int):
        cfg = self.cfg
        rank = self._trainer.global_rank if self._trainer is not None else 0
        gen = torch.Generator(device=self.device)
        gen.manual_seed(sampling_seed(self.seed, self.global_step, rank))
        self.model.eval()
        for mb in prompt_micro_batches(batch, self.stage.batch_size):
            rollout = sample_completions(
                self.model, mb["input_ids"], mb["attention_mask"], mb["pixel_values"],
                mb["image_counts"], n=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_p=cfg.top_p,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id, generator=gen,
            )  # fmt: skip
            ids = rollout.completion_ids.masked_fill(
                ~rollout.completion_mask.bool(), self.tokenizer.pad_token_id
            )
            texts = [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
            for i, (dataset, sid) in enumerate(zip(mb["datasets"], mb["ids"], strict=True)):
                key = f"{dataset}/{sid}"
                if key in self.rows:  # a prompt seen again (a second epoch) keeps its first
                    continue
                samples = texts[i * cfg.num_samples : (i + 1) * cfg.num_samples]
                scores = mbr_scores(samples, self.similarity)
                self.rows[key] = scored_record(self.raw_prompts[key], samples, scores)
        optimizer = self.optimizers()
        optimizer.step()
        self.log("generate/prompts", float(len(self.rows)), prog_bar=True, batch_size=1)
        return None

    def on_train_end(self) -> None:
        if self._trainer is not None and not self._trainer.is_global_zero:
            return
        write_data(self.stage_dir / "data", list(self.rows.values()), self.cfg.min_consistency)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["vlmtrain_generated"] = json.dumps(self.rows)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.rows = json.loads(checkpoint.get("vlmtrain_generated", "{}"))


def write_data(out: Path, rows: list[dict], min_consistency: float = 0.0) -> dict:
    """The three JSONL files and their fingerprint, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    content = {
        "samples.jsonl": rows,
        "sft.jsonl": [sft_record(r) for r in rows if r["best_score"] >= min_consistency],
        "pref.jsonl": [p for r in rows if (p := pair_record(r)) is not None],
    }
    fingerprint = {}
    for name, records in content.items():
        text = "".join(json.dumps(r) + "\n" for r in records)
        tmp = out / f".{name}.tmp-{os.getpid()}"
        tmp.write_text(text)
        os.replace(tmp, out / name)
        fingerprint[name] = {
            "rows": len(records),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
        }
    (out / "fingerprint.json").write_text(json.dumps(fingerprint, indent=1))
    return fingerprint


def _raw_prompts(datamodule) -> dict[str, dict]:
    """(dataset/id) -> what the written records keep of each prompt."""
    out = {}
    for name in datamodule.stage.mixture:
        path = datamodule.datasets[name].train
        for s in datamodule.read(path):
            turns = [
                {"from": "human" if m["role"] == "user" else m["role"], "value": m["content"]}
                for m in s["messages"][:-1]
            ]
            out[f"{name}/{s['id']}"] = {
                "id": s["id"],
                "images": list(s["images"]),
                "conversations": turns,
                "reference": s["messages"][-1]["content"],
                "type": s.get("type"),
            }
    return out


def _check(cfg) -> None:
    g, key = cfg.stage.generate, f"stage {cfg.stage.name!r}: stage.generate"
    if g.num_samples < 2:
        raise ValueError(f"{key}.num_samples={g.num_samples}: consistency needs at least 2")
    if g.temperature <= 0 or not 0 < g.top_p <= 1:
        raise ValueError(f"{key}: temperature > 0 (samples must differ) and top_p in (0, 1]")
    moving = [c for c in ("vision", "projector", "lm") if cfg.stage.trainable[c]]
    if moving or cfg.stage.lora.enabled:
        raise ValueError(
            f"stage {cfg.stage.name!r} generates and trains nothing: set stage.trainable."
            f"{'/'.join(moving) or 'lora'} to false"
        )
    similarity_for(g.similarity, g.answer_marker, f"{key}.similarity")
    if world_size_of(cfg.trainer) > 1:  # rank 0 writes the files and holds only its rows
        raise ValueError(
            f"stage {cfg.stage.name!r} (objective=generate) runs in one process; "
            "set trainer.devices=1 and trainer.num_nodes=1 for it"
        )


def _build(cfg, model, tokenizer, encoder, stage_dir):
    datamodule = PromptDataModule(cfg.data, cfg.stage, encoder, cfg.seed)
    module = GenerateModule(
        model, cfg.stage, tokenizer, cfg.seed, stage_dir, _raw_prompts(datamodule)
    )
    return module, datamodule


def _extra_memory(cfg, counts: dict[str, tuple[int, int]], bytes_per_param: int) -> dict:
    """The generation's KV cache: num_samples completions of each prompt of a micro-batch."""
    g = cfg.stage.generate
    sequences = cfg.stage.batch_size * g.num_samples
    length = cfg.stage.max_length + g.max_new_tokens
    return {"generation_kv_cache": kv_cache_bytes(cfg.model.lm, length, sequences, bytes_per_param)}


OBJECTIVE = Objective(build=_build, check=_check, extra_memory=_extra_memory)
