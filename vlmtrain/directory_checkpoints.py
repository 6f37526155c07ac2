"""Checkpoints that are directories, not one file: torch distributed checkpoints
(trainer=fsdp, one shard per rank) and DeepSpeed's (trainer=deepspeed_*). Read for what
a resume checks (``vlmtrain.checkpoints``): the record, and the tensors' global shapes."""

from __future__ import annotations

from pathlib import Path

from vlmtrain.checkpoints import (
    SHARDED_SHAPES,
    CheckpointError,
    DamagedCheckpoint,
    load_weights_only,
)

SHARDED_META = "meta.pt"  # Lightning's metadata file in a distributed checkpoint


def read_deepspeed_checkpoint(path: Path) -> dict:
    """A DeepSpeed checkpoint directory (Lightning's layout): the client state Lightning
    stores beside rank 0's model states, vlmtrain's record included. Tensor shapes are
    not checked here (ZeRO partitions them)."""
    states = path / "checkpoint" / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise DamagedCheckpoint(f"the DeepSpeed checkpoint lacks {states.name}")
    try:
        contents = load_weights_only(states, mmap=True)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise DamagedCheckpoint(f"{states.name} does not load ({str(e).splitlines()[0]})") from None
    contents.pop("module", None)
    return contents


def read_sharded_checkpoint(path: Path) -> dict:
    """A torch distributed checkpoint directory: Lightning's ``meta.pt`` (loops, callbacks,
    vlmtrain's record) and, from DCP's own ``.metadata``, every tensor's global shape."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not (path / ".metadata").is_file() or not (path / SHARDED_META).is_file():
        raise DamagedCheckpoint("the sharded checkpoint lacks its .metadata or meta.pt")
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # DCP raises whatever unpickling its metadata raised
        raise DamagedCheckpoint(f"its .metadata does not load ({e})") from None
    # Each rank's shard file, as the metadata names it.
    shards = {info.relative_path for info in (metadata.storage_data or {}).values()}
    missing = shards - {p.name for p in path.iterdir()}
    if missing:
        raise DamagedCheckpoint(f"shard files missing: {', '.join(sorted(missing))}")
    try:
        contents = load_weights_only(path / SHARDED_META, mmap=True)
    except CheckpointError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError, KeyError) as e:
        raise DamagedCheckpoint(f"its meta.pt does not load ({str(e).splitlines()[0]})") from None
    prefix = "state_dict."
    contents[SHARDED_SHAPES] = {
        k[len(prefix) :]: tuple(v.size)
        for k, v in metadata.state_dict_metadata.items()
        if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)
    }
    return contents


def read_directory_checkpoint(path: Path) -> dict:
    if (path / "checkpoint").is_dir():
        return read_deepspeed_checkpoint(path)
    return read_sharded_checkpoint(path)
