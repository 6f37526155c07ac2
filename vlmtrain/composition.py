"""Per-stage models: any encoder with any LM, stage by stage.

A stage's ``model`` overrides parts of the recipe's model (another LM, projector,
resolution, tokenizer); the merge is the stage's *effective* model, which its
config hash, plan, artifact and evaluation use. ``resolve_init`` says where each
component starts (fresh, pretrained, ``from:<stage>`` or an artifact);
``check_handoffs`` builds the source and target models on the meta device when the
recipe starts and refuses, before any stage trains, a hand-off across architectures,
tensor shapes or tokenizers.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vlmtrain.config import COMPONENTS, ModelConfig
from vlmtrain.model.resolution import is_position_table


# ------------------------------------------------------------------ init sources
def resolve_init(stage: DictConfig, model_cfg: DictConfig, run_dir: Path) -> dict[str, str | Path]:
    """component -> 'fresh' | 'pretrained' | artifact directory."""
    out: dict[str, str | Path] = {}
    for name in COMPONENTS:
        spec = str(stage.init[name])
        has_path = name != "projector" and bool(model_cfg[name].path)
        if spec == "auto":
            out[name] = "pretrained" if has_path else "fresh"
        elif spec == "pretrained":
            if not has_path:
                raise ValueError(
                    f"stage.init.{name}=pretrained, but model.{name}.path is not set"
                    + (" (the projector has no pretrained source)" if name == "projector" else "")
                )
            out[name] = "pretrained"
        elif spec == "fresh":
            if has_path:
                raise ValueError(
                    f"stage.init.{name}=fresh, but model.{name}.path names pretrained weights; "
                    f"set one or the other"
                )
            out[name] = "fresh"
        elif spec.startswith("from:"):
            source = run_dir / spec[len("from:") :] / "artifact"
            if not (source / "manifest.json").is_file():
                raise FileNotFoundError(
                    f"stage.init.{name}={spec!r}: that stage has no artifact at {source} "
                    "(it has not finished in this run)"
                )
            out[name] = source
        else:
            from vlmtrain.artifacts import read_manifest

            read_manifest(Path(spec))  # fails clearly when it is not an artifact
            out[name] = Path(spec)
    return out


def check_frozen_fresh(stage: DictConfig, init: dict[str, str | Path]) -> None:
    """A random component that does not train makes the stage meaningless: refuse it
    unless the stage says it is intended (stage.allow_frozen_fresh)."""
    if stage.allow_frozen_fresh:
        return
    for name in COMPONENTS:
        if init[name] == "fresh" and not stage.trainable[name]:
            raise ValueError(
                f"stage {stage.name!r}: its {name} starts fresh (random weights) and does not "
                f"train (stage.trainable.{name}=false), so the stage would read a random, frozen "
                f"{name}. Take it from an earlier stage (stage.init.{name}=from:<stage>) or an "
                + ("artifact" if name == "projector" else f"artifact or model.{name}.path")
                + f", train it (stage.trainable.{name}=true), or set "
                "stage.allow_frozen_fresh=true if that is intended"
            )


# ----------------------------------------------------------------------- composition
def effective_model(model: DictConfig, override: Any, where: str) -> DictConfig:
    """The recipe's ``model`` with a stage's override merged over it, checked against
    ModelConfig (an unknown or mistyped key fails, named as ``where.<key>``)."""
    if OmegaConf.is_config(override):  # resolved against the recipe (it may name another stage's)
        override = OmegaConf.to_container(override, resolve=True)
    if not override:
        return model
    if not isinstance(override, dict):
        raise ValueError(f"{where} must be a mapping of model fields, not {override!r}")
    _check_inherited_paths(model, override, where)
    base = copy.deepcopy(model)
    OmegaConf.set_struct(base.lm.extra, False)  # any transformers config keyword goes there
    try:
        return OmegaConf.merge(base, override)
    except OmegaConfBaseException as e:
        raise ValueError(f"{where}: {str(e).splitlines()[0]}") from None


def _check_inherited_paths(model: DictConfig, override: dict[str, Any], where: str) -> None:
    """A stage that describes another tower or LM while inheriting the recipe's
    pretrained path would silently load the recipe's weights (a path wins over dims)."""
    for comp in ("vision", "lm"):
        given = override.get(comp)
        if not isinstance(given, dict) or "path" in given:
            continue
        changed = sorted(set(given) - {"feature_layer"})
        if changed and model[comp].path:
            raise ValueError(
                f"{where}.{comp} sets {', '.join(changed)} but inherits "
                f"model.{comp}.path={model[comp].path!r}, whose weights and dimensions would "
                f"be loaded instead; set {where}.{comp}.path (null for a {comp} built from "
                "its dimensions)"
            )


def describe_model(model: Any) -> str:
    """One line naming a model's parts, for plans and summaries."""
    v, p, lm = model["vision"], model["projector"], model["lm"]
    vision = (
        f"{v['type']} {v['path']}"
        if v.get("path")
        else f"{v['type']} {v['hidden_size']}x{v['num_hidden_layers']} "
        f"{v['image_size']}px/{v['patch_size']}"
    )
    projector = p["type"] + (f" r{p['downsample']}" if p["type"] == "pixel_shuffle_mlp" else "")
    language = (
        f"{lm['type']} {lm['path']}"
        if lm.get("path")
        else f"{lm['type']} {lm['hidden_size']}x{lm['num_hidden_layers']}"
    )
    return f"{model['name']}: vision {vision} + {projector} + lm {language}"


def tokenizer_record(model: DictConfig, tokenizer) -> dict[str, Any]:
    """What the manifest records of the tokenizer a stage used (its copy is in the artifact)."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "source": str(model.tokenizer),
        "vocab_size": len(tokenizer),
        "image_token": model.image_token,
        "image_token_id": tokenizer.convert_tokens_to_ids(model.image_token),
        "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()[:16],
    }


# -------------------------------------------------------------------------- hand-offs
class _Side:
    """One end of a hand-off: a model config, built on the meta device when first asked."""

    def __init__(self, label: str, model: DictConfig, tokenizer_dir: str | None):
        self.label, self.cfg, self.tokenizer_dir = label, model, tokenizer_dir
        self._model = None
        self._tokenizer: Any = False  # not loaded yet

    @property
    def tokenizer(self):
        if self._tokenizer is False:
            from vlmtrain.model.lm import load_tokenizer

            path = self.tokenizer_dir
            self._tokenizer = None
            if path and Path(path).is_dir():
                cfg = self.cfg.copy()
                cfg.tokenizer = path
                self._tokenizer = load_tokenizer(cfg)
        return self._tokenizer

    @property
    def vocab_known(self) -> bool:
        return self.tokenizer is not None or bool(self.cfg.lm.vocab_size)

    def model(self):
        if self._model is None:
            from vlmtrain.model.vlm import VisionLanguageModel

            cfg = self.cfg
            if not self.vocab_known:  # sized for comparison only; embeddings are then skipped
                cfg = OmegaConf.merge(cfg, {"lm": {"vocab_size": 1024}})
            self._model = VisionLanguageModel.build(cfg, self.tokenizer, device="meta")
        return self._model


def _tokenizer_dir(model: DictConfig) -> str | None:
    return None if OmegaConf.is_missing(model, "tokenizer") else str(model.tokenizer)


def _artifact_side(label: str, artifact: Path) -> _Side:
    from vlmtrain.artifacts import read_manifest

    recorded = read_manifest(artifact)["config"]["model"]
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), recorded)
    model.tokenizer = str(artifact / "tokenizer")
    return _Side(label, model, model.tokenizer)


def check_handoffs(stages: list[tuple[str, DictConfig]], run_dir: Path | None) -> None:
    """Every ``init.<component>`` taken from another stage or an artifact fits this
    stage's model: same architecture, same tensor names and shapes and, for the LM,
    the same tokenizer. ``stages`` are (name, stage config as ``stage_config`` gives
    it); order is checked first (``recipe.check_order``)."""
    sides = {name: _Side(f"stage {name!r}", s.model, _tokenizer_dir(s.model)) for name, s in stages}
    for name, scfg in stages:
        for comp in COMPONENTS:
            spec = str(scfg.stage.init[comp])
            if spec.startswith("from:"):
                source = spec[len("from:") :]
                src = sides.get(source)
                if src is None and run_dir is not None:
                    artifact = Path(run_dir) / source / "artifact"
                    src = _artifact_side(f"finished stage {source!r}", artifact)
            elif spec in ("auto", "fresh", "pretrained"):
                continue
            else:
                src = _artifact_side(f"artifact {spec!r}", Path(spec))
            if src is not None:
                _check_one(f"stages.{name}.init.{comp}={spec!r}", comp, src, sides[name])


def _check_one(where: str, comp: str, src: _Side, dst: _Side) -> None:
    a, b = src.model().components()[comp], dst.model().components()[comp]
    arch_a, arch_b = _architecture(comp, a, src.cfg), _architecture(comp, b, dst.cfg)
    if arch_a != arch_b:
        raise ValueError(
            f"{where}: {src.label} has a {comp} of architecture {arch_a}, this stage {arch_b}; "
            f"a component is carried only into the same architecture (init.{comp}=fresh or "
            "pretrained starts a new one)"
        )
    if comp == "lm":
        _check_same_tokenizer(where, src, dst)
    skip = set()
    if comp == "lm" and not (src.vocab_known and dst.vocab_known):
        skip = _embedding_names(a) | _embedding_names(b)
    if comp == "vision":  # resized for this stage's resolution when loaded (model.resolution)
        skip = {k for k in a.state_dict() if is_position_table(k)}
    shapes_a = {k: tuple(t.shape) for k, t in a.state_dict().items() if k not in skip}
    shapes_b = {k: tuple(t.shape) for k, t in b.state_dict().items() if k not in skip}
    problems = [f"{k}: only in {src.label}" for k in sorted(set(shapes_a) - set(shapes_b))]
    problems += [f"{k}: only in this stage" for k in sorted(set(shapes_b) - set(shapes_a))]
    problems += [
        f"{k}: {src.label} {shapes_a[k]} vs this stage {shapes_b[k]}"
        for k in sorted(set(shapes_a) & set(shapes_b))
        if shapes_a[k] != shapes_b[k]
    ]
    if problems:
        shown = problems[:12] + ([f"... {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise ValueError(
            f"{where}: the {comp} of {src.label} does not fit this stage's model:\n  "
            + "\n  ".join(shown)
            + _hint(comp, src, dst)
        )


def _architecture(comp: str, module, cfg: DictConfig) -> str:
    if comp == "vision":
        stem = cfg.vision.stem
        if cfg.vision.type == "vit_hybrid":
            stem = {"bit": "BiT", "resnet": "ResNet", "focalnet": "FocalNet"}[
                cfg.vision.get("backbone") or "bit"
            ]
        return f"{module.config.model_type} (stem {stem})"
    if comp == "lm":
        return module.config.model_type
    return type(module).__name__


def _embedding_names(lm) -> set[str]:
    embeddings = {id(m.weight) for m in (lm.get_input_embeddings(), lm.get_output_embeddings())}
    return {k for k, p in lm.named_parameters(remove_duplicate=False) if id(p) in embeddings}


def _check_same_tokenizer(where: str, src: _Side, dst: _Side) -> None:
    """An LM's embedding rows are its tokenizer's ids: another tokenizer of the same
    size would pass the shape check and scramble every token."""
    if src.tokenizer is not None and dst.tokenizer is not None:
        same = src.tokenizer.get_vocab() == dst.tokenizer.get_vocab()
    else:
        same = src.tokenizer_dir == dst.tokenizer_dir
    if not same:
        raise ValueError(
            f"{where}: {src.label} used tokenizer {src.tokenizer_dir!r}, this stage "
            f"{dst.tokenizer_dir!r}; an LM is carried only with its own tokenizer (its "
            "embedding rows are that tokenizer's ids)"
        )


def _hint(comp: str, src: _Side, dst: _Side) -> str:
    if comp != "projector":
        return ""
    a = src.model().language_model.config.hidden_size
    b = dst.model().language_model.config.hidden_size
    if a == b:
        return ""
    return (
        f"\nThe projector's output width is its LM's hidden size ({a} there, {b} here); "
        "init.projector=fresh starts a projector sized for this stage's LM."
    )
