"""The LightningDataModule of a stage: its mixture, encoded on the fly, via stateful loaders.

Train batches come from torchdata's ``StatefulDataLoader`` over an
``EpochShuffleSampler``; both positions are saved in every checkpoint, so a
resumed run continues with the very next batch. Each rank takes its own shard
(the trainer is told not to add a DistributedSampler).
One train batch holds ``batch_size * accumulate`` samples: one optimizer step.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from vlmtrain.config import DataConfig, StageConfig, dataset_config
from vlmtrain.data.encode import SampleEncoder, collate
from vlmtrain.data.mixture import MixtureDataset
from vlmtrain.data.packing import pack_collate
from vlmtrain.data.sampler import EpochShuffleSampler
from vlmtrain.data.samples import load_samples
from vlmtrain.data.wait import DataWait, TimedLoader


class StageDataModule(L.LightningDataModule):
    # Reads one data file into samples ``encoder`` takes (an objective may read its own).
    read = staticmethod(load_samples)

    def __init__(self, data: DataConfig, stage: StageConfig, encoder: SampleEncoder, seed: int):
        super().__init__()
        self.data = data
        self.stage = stage
        self.encoder = encoder
        self.seed = seed
        self.collate = partial(collate, pad_token_id=encoder.tokenizer.pad_token_id)
        unknown = sorted(set(stage.mixture) - set(data.datasets))
        if not stage.mixture:
            raise ValueError(f"stage.mixture of stage {stage.name!r} is empty")
        if unknown:
            raise ValueError(
                f"stage.mixture names {unknown}, which data={data.name!r} does not define "
                f"(data.datasets has {sorted(data.datasets)})"
            )
        self.datasets = {name: dataset_config(data, name) for name in stage.mixture}
        self.data_wait = DataWait()  # the train loader's wait for batches (perf/data_wait_s)

    def _mixture(self, split: str, total: int | None = None) -> MixtureDataset | None:
        sources, paths = {}, {}
        for name, weight in self.stage.mixture.items():
            path = getattr(self.datasets[name], split)
            if weight > 0:
                if path is None:
                    return None
                sources[name], paths[name] = self.read(path), path
        encoder = self.encoder
        if self.data.get("encoded_store") and isinstance(encoder, SampleEncoder):
            sources, encoder = self._stored(sources, paths)
        return MixtureDataset(
            sources,
            self.stage.mixture,
            encoder,
            self.seed,
            total,
            self.data.cache_encoded,
            self.data.max_skipped,
        )

    def _stored(self, sources: dict, paths: dict):
        """Sources read through the encoded store (vlmtrain.data.store), built once."""
        from vlmtrain.data.fingerprint import file_fingerprint
        from vlmtrain.data.store import StoredEncoder, StoredSource, open_store

        tables, stored = {}, {}
        for name, samples in sources.items():
            fp = file_fingerprint(Path(paths[name]), Path(self.data.root), True, name)
            file_key = f"{fp['sha256']}:{fp['images']}"
            table = open_store(self.data.encoded_store, file_key, samples, self.encoder)
            # Samples name their file as ``source``: the encoder finds the table by it.
            tables[samples[0]["source"]] = table
            stored[name] = StoredSource(samples, table)
        return stored, StoredEncoder(self.encoder, tables)

    def setup(self, stage: str | None = None) -> None:
        self.train_set = self._mixture("train")
        step_samples = self.stage.batch_size * self.stage.accumulate
        if len(self.train_set) < step_samples:
            raise ValueError(
                f"the training mixture has {len(self.train_set)} samples, fewer than one step "
                f"(stage.batch_size * stage.accumulate = {step_samples})"
            )
        self.val_set = None
        if self.stage.val_every:
            self.val_set = self._mixture("val", self.stage.val_batches * self.stage.batch_size)

    def train_dataloader(self) -> StatefulDataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        step_samples = self.stage.batch_size * self.stage.accumulate
        lengths = self.train_set.length_hints() if self.stage.group_by_length else None
        sampler = EpochShuffleSampler(
            len(self.train_set), self.seed, rank, world, lengths, step_samples * world
        )
        loader = TimedLoader(
            self.train_set,
            batch_size=step_samples,
            sampler=sampler,
            drop_last=True,
            collate_fn=self.train_collate(),
            num_workers=self.data.num_workers,
            # Its own generator: creating the iterator draws a seed, which from the global
            # one would shift every dropout mask after a resume (the iterator is created
            # after the checkpoint's random state is restored).
            generator=torch.Generator().manual_seed(self.seed),
        )
        loader.wait = self.data_wait
        return loader

    def train_collate(self):
        """A step's samples right-padded, or packed into rows (stage.packing; validation
        batches stay unpacked: their loss is the same either way)."""
        if not self.stage.packing:
            return self.collate
        pad = self.encoder.tokenizer.pad_token_id
        return partial(
            pack_collate,
            pad_token_id=pad,
            max_length=self.stage.max_length,
            batch_size=self.stage.batch_size,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.stage.batch_size, collate_fn=self.collate)
