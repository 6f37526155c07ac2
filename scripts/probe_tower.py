"""Frozen-feature linear probes of a vision tower on the shapes world (AIMv2's frozen-trunk
evaluation, reduced to what the shapes world labels): from the mean of the tower's patch
features (full attention), a linear layer predicts the number of objects (classes), and
which shapes and which colours are present (one binary label each). A fourth probe reads
*where*: from the features of single patches lying on an object, a linear layer predicts
the patch's column and its row in the grid (the information a "where is X?" answer must
find in the image tokens themselves; reported as the mean of the two accuracies).
``--words`` (data with OCR) instead asks whether the tower can read: from the 3 x 3 patches
around a word written on a shape, a linear layer names the word (one of 20).

    python scripts/probe_tower.py runs/x/aim/artifact [--fresh] [--data-root ...]
    python scripts/probe_tower.py --tower type=vit_hybrid --tower backbone=resnet ...
    python scripts/probe_tower.py runs/x/multitask/artifact --words --data-root ...

``--fresh`` probes the same architecture at its random initialization (the artifact's
seed), which is where a stage without pretraining starts; ``--tower KEY=VALUE`` (no
artifact) probes a random tower built from those model.vision settings, seed 0. Train: caption_train images;
test: caption_test images. The majority-label accuracy is printed beside each figure.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vlmtrain.artifacts import load_image_processor, load_model, read_manifest
from vlmtrain.config import VisionConfig
from vlmtrain.data.images import to_rgb
from vlmtrain.data.shapes_world import Obj, word_box
from vlmtrain.model.vision import build_image_processor, build_vision_tower
from vlmtrain.model.vlm import VisionLanguageModel

REPO = Path(__file__).resolve().parents[1]


def fresh_tower(settings: list[str]):
    """A random tower from ``KEY=VALUE`` model.vision settings (ints parsed), seed 0."""
    fields = {}
    for item in settings:
        key, _, value = item.partition("=")
        fields[key] = int(value) if value.lstrip("-").isdigit() else value
    cfg = VisionConfig(**fields)
    torch.manual_seed(0)
    tower = build_vision_tower(cfg).eval()
    return tower, build_image_processor(cfg, tower.spec())


def tower_of(artifact: Path, fresh: bool):
    model, tokenizer, model_cfg = load_model(artifact)
    if fresh:  # as a stage from scratch builds it: seeded, then the components
        torch.manual_seed(read_manifest(artifact)["config"]["seed"])
        model = VisionLanguageModel.build(model_cfg, tokenizer).eval()
    processor = load_image_processor(artifact, model_cfg, model.vision_spec)
    return model.vision_tower, processor


def object_patches(objects: list[dict], canvas: int, grid: int) -> list[tuple[int, int]]:
    """(column, row) of every patch whose centre lies inside one of the objects' boxes."""
    cells = []
    for o in objects:
        x0, y0, x1, y1 = o["bbox"]
        for row in range(grid):
            for col in range(grid):
                cx, cy = (col + 0.5) * canvas / grid, (row + 0.5) * canvas / grid
                if x0 <= cx < x1 and y0 <= cy < y1:
                    cells.append((col, row))
    return cells


def tower_tokens(tower, processor, records: list[dict], root: Path):
    """(records, the tower's output tokens for their images), 64 images at a time."""
    for start in range(0, len(records), 64):
        chunk = records[start : start + 64]
        images = [to_rgb(Image.open(root / r["image"])) for r in chunk]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            yield chunk, tower(pixels)


def features_and_labels(tower, processor, records: list[dict], root: Path, vocab: dict):
    feats, counts, shapes, colours = [], [], [], []
    patch_feats, places = [], []
    canvas = json.loads((root / "meta.json").read_text())["config"]["canvas"]
    for chunk, tokens in tower_tokens(tower, processor, records, root):
        feats.append(tokens.mean(1))
        grid = int(tokens.shape[1] ** 0.5)
        for tok, r in zip(tokens, chunk, strict=True):
            for col, row in object_patches(r["objects"], canvas, grid):
                patch_feats.append(tok[row * grid + col])
                places.append((col, row))
        for r in chunk:
            objs = r["objects"]
            counts.append(len(objs))
            shapes.append([float(any(o["shape"] == s for o in objs)) for s in vocab["shape"]])
            colours.append([float(any(o["colour"] == c for o in objs)) for c in vocab["colour"]])
    return (
        torch.cat(feats),
        torch.tensor(counts),
        torch.tensor(shapes),
        torch.tensor(colours),
        (torch.stack(patch_feats), torch.tensor(places), grid),
    )


def fit(x: torch.Tensor, y: torch.Tensor, outputs: int, multilabel: bool, steps: int = 500):
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], outputs)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        out = probe(x)
        loss = F.binary_cross_entropy_with_logits(out, y) if multilabel else F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return probe


def probe(
    artifact: Path | None,
    data_root: Path,
    fresh: bool = False,
    limit: int = 2000,
    tower_settings: list[str] | None = None,
) -> dict:
    if artifact is None:
        tower, processor = fresh_tower(tower_settings or [])
    else:
        tower, processor = tower_of(artifact, fresh)
    tower.eval()
    train = json.loads((data_root / "caption_train.json").read_text())[:limit]
    test = json.loads((data_root / "caption_test.json").read_text())
    vocab = {k: sorted({o[k] for r in train for o in r["objects"]}) for k in ("shape", "colour")}
    xtr, ctr, str_, cotr, ptr = features_and_labels(tower, processor, train, data_root, vocab)
    xte, cte, ste, cote, pte = features_and_labels(tower, processor, test, data_root, vocab)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6  # standardized features, train statistics
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    classes = int(max(ctr.max(), cte.max())) + 1
    out = {}
    count_probe = fit(xtr, ctr, classes, multilabel=False)
    majority = torch.bincount(ctr, minlength=classes).argmax()
    out["count"] = (
        (count_probe(xte).argmax(1) == cte).float().mean().item(),
        (cte == majority).float().mean().item(),
    )
    for name, ytr, yte in (("shape", str_, ste), ("colour", cotr, cote)):
        p = fit(xtr, ytr, ytr.shape[1], multilabel=True)
        with torch.no_grad():
            accuracy = ((p(xte) > 0).float() == yte).float().mean().item()
        majority = (ytr.mean(0) > 0.5).float()
        out[name] = (accuracy, (yte == majority).float().mean().item())
    out["position"] = position_probe(ptr, pte)
    return out


def linear_accuracy(train, test, classes: int) -> float:
    """Test accuracy of a linear classifier fit on standardized train features."""
    (xtr, ytr), (xte, yte) = train, test
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    p = fit((xtr - mean) / std, ytr, classes, multilabel=False)
    with torch.no_grad():
        return (p((xte - mean) / std).argmax(1) == yte).float().mean().item()


def position_probe(train, test) -> tuple[float, float]:
    """Mean accuracy over column and row of a linear probe on single object patches."""
    (xtr, ytr, grid), (xte, yte, _) = train, test
    accuracies, majorities = [], []
    for axis in (0, 1):
        accuracies.append(linear_accuracy((xtr, ytr[:, axis]), (xte, yte[:, axis]), grid))
        majority = torch.bincount(ytr[:, axis], minlength=grid).argmax()
        majorities.append((yte[:, axis] == majority).float().mean().item())
    return sum(accuracies) / 2, sum(majorities) / 2


def word_windows(tower, processor, records: list[dict], root: Path, words: list[str]):
    """For every shape carrying a word: the features of the 3 x 3 patches around the word's
    centre (where the generator wrote it), concatenated, and the word's index."""
    canvas = json.loads((root / "meta.json").read_text())["config"]["canvas"]
    feats, labels = [], []
    for chunk, tokens in tower_tokens(tower, processor, records, root):
        grid = int(tokens.shape[1] ** 0.5)
        padded = F.pad(tokens.unflatten(1, (grid, grid)), (0, 0, 1, 1, 1, 1))
        for tok, r in zip(padded, chunk, strict=True):
            for o in map(Obj.from_json, r["objects"]):
                x0, y0, x1, y1 = word_box(o)
                col = min(grid - 1, int((x0 + x1) / 2 * grid / canvas))
                row = min(grid - 1, int((y0 + y1) / 2 * grid / canvas))
                feats.append(tok[row : row + 3, col : col + 3].flatten())
                labels.append(words.index(o.word))
    return torch.stack(feats), torch.tensor(labels)


def word_probe(artifact: Path, data_root: Path, limit: int = 2000) -> tuple[float, float]:
    """Accuracy of a linear probe naming the word written on a shape from the tower's
    features around it (OCR data: ocr_train scenes to fit, ocr_val and ocr_test to score)."""
    tower, processor = tower_of(artifact, fresh=False)
    tower.eval()
    words = json.loads((data_root / "meta.json").read_text())["words"]
    files = {
        n: json.loads((data_root / f"ocr_{n}.json").read_text()) for n in ("train", "val", "test")
    }
    train = word_windows(tower, processor, files["train"][:limit], data_root, words)
    test = word_windows(tower, processor, files["val"] + files["test"], data_root, words)
    return linear_accuracy(train, test, len(words)), 1 / len(words)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, nargs="?")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--tower", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-root", type=Path, default=REPO / "data/generated/shapes")
    parser.add_argument(
        "--words", action="store_true", help="only the word probe (data with OCR samples)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if (args.artifact is None) == (not args.tower):
        parser.error("give an artifact or --tower settings, not both")
    if args.words:
        if args.artifact is None or not (args.data_root / "ocr_train.json").exists():
            parser.error("--words needs an artifact and a --data-root generated with OCR")
        acc, chance = word_probe(args.artifact, args.data_root)
        print(f"word: {acc:.3f} (chance {chance:.3f})")
        return
    results = probe(args.artifact, args.data_root, args.fresh, tower_settings=args.tower)
    for name, (acc, base) in results.items():
        print(f"{name}: {acc:.3f} (majority {base:.3f})")


if __name__ == "__main__":
    main()
