"""Which parameters train: explicit per component, logged as a table at start."""

from __future__ import annotations

from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from rich.table import Table

from vlmtrain.config import LoraConfig, TrainableConfig
from vlmtrain.model.vlm import VisionLanguageModel


def apply_trainable(
    model: VisionLanguageModel, trainable: TrainableConfig, lora: LoraConfig
) -> None:
    """Freeze / unfreeze each component; with LoRA, wrap the LM and train only its adapters.
    The model is left in training mode, the BatchNorm layers of its frozen components in
    eval mode (VisionLanguageModel.train)."""
    for name, module in model.components().items():
        module.requires_grad_(bool(getattr(trainable, name)))
    if lora.enabled:
        if not trainable.lm:
            raise ValueError("stage.lora.enabled=true needs stage.trainable.lm=true")
        # Wrapping only the LM keeps LoRA off the vision tower's same-named projections.
        model.language_model = get_peft_model(
            model.language_model,
            PeftLoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
                task_type="CAUSAL_LM",
            ),
        )
    model.train()


def parameter_counts(model: VisionLanguageModel) -> dict[str, tuple[int, int]]:
    """component -> (trainable, frozen) parameter counts."""
    counts = {}
    for name, module in model.components().items():
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        total = sum(p.numel() for p in module.parameters())
        counts[name] = (trainable, total - trainable)
    return counts


def parameter_table(model: VisionLanguageModel, title: str = "parameters") -> Table:
    table = Table(title=title)
    for col in ("component", "trainable", "frozen", "total"):
        table.add_column(col, justify="left" if col == "component" else "right")
    sums = [0, 0]
    for name, (trainable, frozen) in parameter_counts(model).items():
        table.add_row(name, f"{trainable:,}", f"{frozen:,}", f"{trainable + frozen:,}")
        sums[0] += trainable
        sums[1] += frozen
    table.add_row("all", f"{sums[0]:,}", f"{sums[1]:,}", f"{sum(sums):,}", style="bold")
    return table
