"""Side by side on a held-out split: vlmtrain's own evaluation of an artifact against
its export run by plain transformers (the exported processor builds every input from
the raw image and question). Reports exact-match accuracy of both, how many answers
differ, the largest logit difference and the time each took.

    python scripts/export_parity.py runs/tiny/sft/artifact --data-root data/generated/shapes
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmtrain.artifacts import load_model
from vlmtrain.eval import predict, read_eval_samples
from vlmtrain.eval.shapes_eval import chance_levels, score
from vlmtrain.export import export_artifact
from vlmtrain.model.vision import build_image_processor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact", type=Path)
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    samples = read_eval_samples(args.data_root / f"vqa_{args.split}.json", args.limit)
    chance = chance_levels(args.data_root, args.split)

    model, tokenizer, model_cfg = load_model(args.artifact)
    from vlmtrain.data.images import ImageProcessor

    processor = build_image_processor(model_cfg.vision, model.vision_spec)
    images = ImageProcessor.for_model(processor, model, model_cfg, args.data_root)
    t0 = time.perf_counter()
    ours = predict(model, tokenizer, images, samples, max_new_tokens=8)
    t_ours = time.perf_counter() - t0

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = export_artifact(args.artifact, Path(tmp) / "hf")
        t_export = time.perf_counter() - t0
        hf = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).eval()
        processor = AutoProcessor.from_pretrained(out, local_files_only=True)
        theirs, worst = [], 0.0
        t0 = time.perf_counter()
        for s in samples:
            content = [{"type": "image"}, {"type": "text", "text": s.question}]
            prompt = processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
            image = Image.open(args.data_root / s.images[0]).convert("RGB")
            inputs = processor(images=[image], text=prompt, return_tensors="pt")
            with torch.no_grad():
                new = hf.generate(**inputs, max_new_tokens=8, do_sample=False)
                logits = hf(**inputs).logits
                mine = model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
            worst = max(worst, (logits - mine).abs().max().item())
            ids = new[0, inputs["input_ids"].shape[1] :].tolist()
            eos = tokenizer.eos_token_id
            ids = ids[: ids.index(eos)] if eos in ids else ids
            theirs.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
        t_theirs = time.perf_counter() - t0

    a = score(samples, ours, chance)["overall"]["accuracy"]
    b = score(samples, theirs, chance)["overall"]["accuracy"]
    differ = sum(x != y for x, y in zip(ours, theirs, strict=True))
    print(f"{len(samples)} samples of vqa_{args.split}.json")
    print("| model | exact match | seconds |\n|---|---:|---:|")
    print(f"| vlmtrain (artifact, batched eval) | {a:.3f} | {t_ours:.1f} |")
    print(f"| transformers Llava (export, one by one) | {b:.3f} | {t_theirs:.1f} |")
    print(
        f"answers that differ: {differ}; max |logit difference| {worst:.3g}; export {t_export:.1f} s"
    )


if __name__ == "__main__":
    main()
