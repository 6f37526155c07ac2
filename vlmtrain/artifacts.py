"""Stage artifacts: what a finished stage hands to later stages.

Layout of ``<stage dir>/artifact/``::

    vision.safetensors  projector.safetensors  lm.safetensors   component weights
    vision_config.json  lm_config.json                          transformers configs
    tokenizer/                                                  with the image token
    manifest.json                                               stage, config hash, metrics, versions

Written to a temporary directory and renamed, so a kill during the write never
leaves a partial artifact. Initializing a component from an artifact (this
module) and resuming from a checkpoint (Lightning's ``ckpt_path``) are separate
operations.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_model
from safetensors.torch import load_model as load_safetensors_into
from torch import nn

from vlmtrain.config import COMPONENTS
from vlmtrain.data.fingerprint import describe_changes as describe_data_changes
from vlmtrain.durable import DamagedFileError, atomic_write_json, fsync_dir, read_json
from vlmtrain.model.resolution import position_table_mode, resize_position_table
from vlmtrain.model.vlm import VisionLanguageModel

MANIFEST = "manifest.json"
LORA_ADAPTER = "lora_adapter"


def config_hash(resolved: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


ABSENT = "<absent>"


def config_changes(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """Every leaf where two configs (plain JSON values) differ, as (dotted key, old, new);
    a key on one side only shows ``ABSENT`` on the other."""
    if isinstance(old, dict) and isinstance(new, dict):
        changes = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            changes += config_changes(old.get(key, ABSENT), new.get(key, ABSENT), sub)
        return changes
    return [] if old == new else [(path, old, new)]


def _as_json(value: Any) -> Any:
    """As the manifest stores it: tuples become lists, enums and paths strings."""
    return json.loads(json.dumps(value, default=str))


def same_stage(
    manifest: dict[str, Any], hashed: dict[str, Any], defaults: dict[str, Any]
) -> tuple[bool, list[str]]:
    """Whether a finished stage's artifact is the one ``hashed`` would train, and why not.

    ``hashed`` is what the config hash covers: the config sections and the source
    artifacts' hashes. A key the finished stage's config lacks is no change when
    its value is the schema default (``defaults``, same layout): that is a field
    added to vlmtrain after the stage ran, whose default keeps the old behaviour.
    Returns (same, lines): lines name the changed keys, or the keys taken as
    defaults when the stage is the same.
    """
    if manifest.get("config_hash") == config_hash(hashed):
        return True, []
    if "data_files" in hashed and "data_files" not in manifest:
        # Finished by a vlmtrain that did not fingerprint data: its hash covers the rest.
        hashed = {k: v for k, v in hashed.items() if k != "data_files"}
        same, why = same_stage(manifest, hashed, defaults)
        note = "its data files (finished before data fingerprints were recorded; not checked)"
        return same, [*why, note] if same else why
    current = _as_json(hashed)
    data_files = current.pop("data_files", None)
    sections = {k: v for k, v in current.items() if k != "sources"}
    stored = {k: manifest.get("config", {}).get(k, ABSENT) for k in sections}
    changes = config_changes(stored, sections)
    added = [c for c in changes if c[1] == ABSENT and c[2] == _lookup(defaults, c[0])]
    if added and len(added) == len(changes):
        for key, _, _ in added:  # the config as the older vlmtrain hashed it
            *parents, leaf = key.split(".")
            node = current
            for part in parents:
                node = node[part]
            del node[leaf]
        if data_files is not None:
            current["data_files"] = data_files
        if manifest.get("config_hash") == config_hash(current):
            return True, [
                f"{key} (new since the stage ran; default {new!r})" for key, _, new in added
            ]
    lines = [f"{key}: {old!r} -> {new!r}" for key, old, new in changes]
    lines += describe_data_changes(manifest.get("data_files"), data_files)
    return False, lines or ["the source artifacts it starts from (stage.init) were retrained"]


def _lookup(tree: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return ABSENT
        tree = tree[part]
    return _as_json(tree)


def code_version(describe: bool = False) -> str:
    """The commit vlmtrain runs from (``git describe`` form: tag, commit, dirty)."""
    command = ["git", "describe", "--always", "--dirty", "--tags"] if describe else None
    try:
        out = subprocess.run(
            command or ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    names = ("vlmtrain", "torch", "lightning", "transformers", "peft", "hydra-core", "torchdata")
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except Exception:
            out[name] = "missing"
    return out


def save_artifact(
    model: VisionLanguageModel,
    tokenizer,
    out_dir: Path,
    manifest: dict[str, Any],
    image_processor=None,
    extras: dict[str, nn.Module] | None = None,
) -> Path:
    """``extras``: modules an objective keeps beside the components (``<name>.safetensors``,
    listed and checked like them), which no later stage needs (e.g. AIM's decoder)."""
    out_dir = Path(out_dir)
    extras = extras or {}
    if clash := set(extras) & set(model.components()):
        raise ValueError(f"artifact extras {sorted(clash)} clash with the model's components")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if hasattr(model.language_model, "merge_and_unload"):
        # LoRA: the adapter on its own (peft's format, loadable onto the base LM with
        # PeftModel.from_pretrained), then merged: later stages and exports get plain weights.
        model.language_model.save_pretrained(tmp / LORA_ADAPTER)
        model.language_model = model.language_model.merge_and_unload()
    saved = {**model.components(), **extras}
    for name, module in saved.items():
        # save_model de-duplicates tied tensors (e.g. tied LM embeddings), which save_file rejects.
        save_model(module, str(tmp / f"{name}.safetensors"))
    model.vision_tower.config.to_json_file(tmp / "vision_config.json")
    model.language_model.config.to_json_file(tmp / "lm_config.json")
    tokenizer.save_pretrained(tmp / "tokenizer")
    if image_processor is not None:  # its normalization, which a pretrained tower may set
        image_processor.save_pretrained(tmp / "image_processor")
    weights = {
        f"{name}.safetensors": (tmp / f"{name}.safetensors").stat().st_size for name in saved
    }
    manifest = {
        **manifest,
        # Unique per save: records of this model (its evaluation) name it, so a retrained
        # stage's new artifact never inherits the old one's (see vlmtrain.records).
        "artifact_id": uuid.uuid4().hex,
        "files": weights,  # sizes, so a truncated copy is told from a whole one
        "versions": package_versions(),
        "code_version": code_version(),
    }
    atomic_write_json(tmp / MANIFEST, manifest)
    for path in tmp.rglob("*"):  # on disk before the rename publishes them
        if path.is_file():
            with path.open("rb+") as f:
                os.fsync(f.fileno())
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    fsync_dir(out_dir.parent)
    return out_dir


def read_manifest(artifact_dir: Path) -> dict[str, Any]:
    path = Path(artifact_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{str(artifact_dir)!r} is not a vlmtrain artifact (no {MANIFEST})")
    manifest = read_json(path, "the artifact's manifest")
    if not isinstance(manifest, dict):
        raise DamagedFileError(path, "the artifact's manifest is damaged (not a JSON object)")
    return manifest


def artifact_problems(artifact_dir: Path) -> list[str]:
    """Why a finished stage's artifact cannot be used (empty when it can): a damaged
    manifest, a missing component, a weight file truncated or with a damaged header.
    Cheap: sizes and safetensors headers, no tensor read."""
    try:
        manifest = read_manifest(artifact_dir)
    except (DamagedFileError, FileNotFoundError) as e:
        return [str(e)]
    sizes = manifest.get("files") or {f"{c}.safetensors": None for c in COMPONENTS}
    problems = []
    for name, size in sizes.items():
        path = Path(artifact_dir) / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        if size is not None and path.stat().st_size != size:
            problems.append(f"{path} is {path.stat().st_size} bytes; the manifest says {size}")
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error type for a bad header
            problems.append(f"{path} does not read back ({e})")
    return problems


def load_component(module: nn.Module, name: str, artifact_dir: Path) -> None:
    """Load one component's weights, failing before any training on a missing component
    or a shape mismatch, naming every tensor involved."""
    path = Path(artifact_dir) / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"artifact {str(artifact_dir)!r} has no component {name!r} ({path.name})"
        )
    own = module.state_dict()
    problems, resized = [], {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            if key not in own:
                problems.append(f"unexpected tensor {key}")
                continue
            shape = tuple(f.get_slice(key).get_shape())
            if shape == tuple(own[key].shape):
                continue
            mode = position_table_mode(key) if name == "vision" else None
            if mode and (shape[:-2], shape[-1]) == (own[key].shape[:-2], own[key].shape[-1]):
                # A tower carried into a stage of another resolution (vlmtrain.model.resolution).
                resized[key] = resize_position_table(
                    f.get_tensor(key), own[key].shape[-2], module.has_class_token, mode
                )
                continue
            problems.append(f"{key}: artifact {shape} vs model {tuple(own[key].shape)}")
    if problems:
        raise ValueError(
            f"component {name!r} from {str(artifact_dir)!r} does not fit the configured model:\n  "
            + "\n  ".join(problems)
        )
    if resized:
        state = {**load_file(str(path)), **resized}
        missing, unexpected = module.load_state_dict(state, strict=False)
    else:
        missing, unexpected = load_safetensors_into(module, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"component {name!r} from {str(artifact_dir)!r}: missing {sorted(missing)}, "
            f"unexpected {sorted(unexpected)}"
        )


def load_model(artifact_dir: Path, device: str = "cpu"):
    """Rebuild the model an artifact was trained as, with its weights and tokenizer.

    Self-contained: every component is built from the configs stored in the artifact,
    never from the pretrained directories it started from, so an artifact can move to
    another machine. The returned model config says so (no pretrained paths)."""
    from omegaconf import OmegaConf
    from transformers import CONFIG_MAPPING

    from vlmtrain.config import ModelConfig
    from vlmtrain.model.lm import load_tokenizer
    from vlmtrain.model.vision import vision_config_class

    artifact_dir = Path(artifact_dir)
    manifest = read_manifest(artifact_dir)
    model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), manifest["config"]["model"])
    model_cfg.tokenizer = str(artifact_dir / "tokenizer")
    configs = {}
    for name, file in (("vision", "vision_config.json"), ("lm", "lm_config.json")):
        if not model_cfg[name].path:
            continue  # built from its dimensions, which the manifest records
        stored = json.loads((artifact_dir / file).read_text())
        cls = (
            vision_config_class(model_cfg.vision)
            if name == "vision"
            else CONFIG_MAPPING[stored["model_type"]]
        )
        configs[name] = cls.from_dict(stored)
        model_cfg[name].path = None
    tokenizer = load_tokenizer(model_cfg)
    model = VisionLanguageModel.build(model_cfg, tokenizer, device=device, configs=configs)
    for name, module in model.components().items():
        load_component(module, name, artifact_dir)
    return model.eval(), tokenizer, model_cfg


def load_image_processor(artifact_dir: Path, model_cfg, spec):
    """The image processor the artifact was trained with (stored in it), or the
    tower's default for artifacts written before processors were stored."""
    from vlmtrain.model.vision import build_image_processor, image_processor_class

    stored = Path(artifact_dir) / "image_processor"
    if stored.is_dir():
        return image_processor_class(model_cfg.vision).from_pretrained(str(stored))
    return build_image_processor(model_cfg.vision, spec)


def reuse_finished(source: Path, artifact_dir: Path, identity: dict, defaults: dict) -> str:
    """Take a stage finished in another run (``start_from``) when it is the stage this
    config would train: its files are hard-linked (copied across file systems) to
    ``artifact_dir``. Returns what happened, for the user."""
    if not (source / MANIFEST).is_file() or artifact_problems(source):
        return f"nothing finished to reuse at {source}; training it here"
    same, why = same_stage(read_manifest(source), identity, defaults)
    if not same:
        return f"not reused from {source}, its config differs:\n  " + "\n  ".join(why)
    tmp = artifact_dir.with_name(artifact_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, copy_function=_link_or_copy)
    tmp.rename(artifact_dir)
    return f"reused from {source}"


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def set_aside_damaged(artifact_dir: Path) -> Path:
    """A damaged artifact is kept for inspection as ``artifact.damaged``."""
    aside = artifact_dir.with_name("artifact.damaged")
    shutil.rmtree(aside, ignore_errors=True)
    artifact_dir.rename(aside)
    return aside
