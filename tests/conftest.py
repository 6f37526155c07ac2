"""Shared fixtures: a small shapes data set and its tokenizer, generated once per session."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SMALL_SHAPES = dict(n_train=60, n_eval=10, n_captions_train=120, n_chat_train=40, n_text_train=120)


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory) -> Path:
    from vlmtrain.data.shapes import ShapesConfig, ensure_shapes

    root = tmp_path_factory.mktemp("shapes") / "shapes"
    ensure_shapes(root, ShapesConfig(seed=0, **SMALL_SHAPES))
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(shapes_root) -> Path:
    return shapes_root / "tokenizer"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models: one intra-op thread is faster than two, and immune to a loaded CPU
    (two OpenMP threads on a busy 2-core machine make these tests 10x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_COMPOSED: dict = {}


@pytest.fixture()
def compose(shapes_root):
    """Compose the real Hydra config (conf/) with overrides, pointed at the small data.
    Memoized per overrides (composing costs ~0.2 s); each call gets its own copy."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from vlmtrain.config import register_configs

    register_configs()

    def _compose(*overrides: str):
        key = (str(shapes_root), overrides)
        if key not in _COMPOSED:
            with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
                _COMPOSED[key] = hydra_compose(
                    config_name="config",
                    overrides=[f"data.root={shapes_root}", "data.generate=null", *overrides],
                )
        return copy.deepcopy(_COMPOSED[key])

    return _compose
