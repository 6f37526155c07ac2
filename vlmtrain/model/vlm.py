"""The assembled vision-language model.

Submodule names follow transformers' Llava (``vision_tower``,
``multi_modal_projector``, ``language_model``) so export is a renaming, not a
conversion. Image features replace the embeddings of the image placeholder
tokens, one feature vector per placeholder position.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from vlmtrain.config import ModelConfig
from vlmtrain.model.lm import build_lm
from vlmtrain.model.projector import build_projector
from vlmtrain.model.vision import VisionSpec, build_vision_tower


class VisionLanguageModel(nn.Module):
    def __init__(
        self,
        vision_tower: nn.Module,
        multi_modal_projector: nn.Module,
        language_model: nn.Module,
        image_token_id: int,
    ):
        super().__init__()
        self.vision_tower = vision_tower
        self.multi_modal_projector = multi_modal_projector
        self.language_model = language_model
        self.image_token_id = image_token_id

    @classmethod
    def build(
        cls,
        cfg: ModelConfig,
        tokenizer: PreTrainedTokenizerBase | None,
        *,
        device: str | torch.device | None = None,
        configs: dict[str, PretrainedConfig] | None = None,
    ) -> VisionLanguageModel:
        """Without a tokenizer (planning), the vocabulary is ``lm.vocab_size`` plus the image
        token. ``configs`` (vision / lm) gives a component's transformers config outright, as
        an artifact stored it, instead of its dimensions or pretrained path."""
        if tokenizer is not None:
            vocab_size = len(tokenizer)
            image_token_id = tokenizer.convert_tokens_to_ids(cfg.image_token)
        elif cfg.lm.vocab_size:
            vocab_size = image_token_id = cfg.lm.vocab_size
            vocab_size += 1
        else:
            raise ValueError("model.lm.vocab_size is needed to build the model without a tokenizer")
        configs = configs or {}
        vision = build_vision_tower(cfg.vision, device=device, config=configs.get("vision"))
        lm = build_lm(cfg.lm, vocab_size, device=device, config=configs.get("lm"))
        with torch.device(device or "cpu"):
            projector = build_projector(
                cfg.projector.type,
                vision.spec().hidden_size,
                lm.config.hidden_size,
                cfg.projector.downsample,
            )
        return cls(vision, projector, lm, image_token_id)

    # --------------------------------------------------------------------- structure
    def components(self) -> dict[str, nn.Module]:
        """The trainable units a stage reasons about, by the names used in configs."""
        return {
            "vision": self.vision_tower,
            "projector": self.multi_modal_projector,
            "lm": self.language_model,
        }

    def train(self, mode: bool = True) -> VisionLanguageModel:
        """The BatchNorm layers of a frozen component stay in eval mode while the rest
        trains: their statistics (a ResNet-stemmed tower's) would otherwise follow every
        batch, and a frozen component would leave the stage other than it came in. The
        component itself stays in training mode: transformers checkpoints a layer's
        activations only then, and backward still passes through a frozen LM."""
        super().train(mode)
        if not mode:
            return self
        for module in self.components().values():
            if not any(p.requires_grad for p in module.parameters()):
                for layer in module.modules():
                    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
                        layer.eval()
        return self

    def enable_activation_checkpointing(self) -> None:
        """Keep only each transformer layer's input for backward and recompute the rest
        (vision tower and LM). Non-reentrant checkpointing, so frozen components and
        LoRA need no inputs that require grad."""
        for model in (self.vision_tower.model, self.language_model):
            model.activation_checkpointing_enable({"use_reentrant": False})

    def compile(self, **kwargs) -> None:  # noqa: A003 - nn.Module.compile, per component
        """torch.compile each component in place (``nn.Module.compile``: parameter names and
        checkpoints unchanged). The LM's decoder is compiled rather than the LM, since
        training calls it directly (logits only at supervised positions). ``dynamic``:
        sequence lengths vary per batch."""
        kwargs.setdefault("dynamic", True)
        for part in (self.vision_tower, self.multi_modal_projector):
            part.compile(**kwargs)
        self.language_model.get_decoder().compile(**kwargs)

    @property
    def vision_spec(self) -> VisionSpec:
        return self.vision_tower.spec()

    @property
    def token_downsample(self) -> int:
        """Patches per image token along each side (pixel shuffle merges r x r patches)."""
        return getattr(self.multi_modal_projector, "downsample", 1)

    @property
    def tokens_per_image(self) -> int:
        return self.vision_spec.tokens_per_image // self.token_downsample**2

    # ----------------------------------------------------------------------- forward
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(num_images, tokens_per_image, d_lm)"""
        return self.multi_modal_projector(self.vision_tower(pixel_values))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features at the image positions: computed from
        ``pixel_values``, or given (``image_features``, e.g. one image's features shared by
        the chosen and rejected answers of a preference pair)."""
        is_image = input_ids == self.image_token_id
        n_positions = int(is_image.sum())
        if image_features is None and (pixel_values is None or pixel_values.numel() == 0):
            if n_positions:
                raise ValueError(f"batch has {n_positions} image positions but no images")
            return self.language_model.get_input_embeddings()(input_ids)
        # The tower runs before the embedding lookup, in the order a rank without images
        # runs it (StageModule._touch_image_path): FSDP's gathers must match across ranks.
        features = self.image_features(pixel_values) if image_features is None else image_features
        embeds = self.language_model.get_input_embeddings()(input_ids)
        features = features.reshape(-1, features.shape[-1])
        if n_positions != features.shape[0]:
            # The data pipeline checks this per sample; reaching here means a caller bypassed it.
            raise ValueError(
                f"batch has {n_positions} image positions but its images give "
                f"{features.shape[0]} feature vectors"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The LM logits: (B, L, V), or (N, V) at the N positions where the boolean
        (B, L) mask ``logits_at`` is set.

        Training needs logits only where a supervised token is predicted: a few
        percent of the positions of a VQA sample, whose 64-576 image positions never
        are. Skipping the rest saves the LM head's compute and, with a real
        vocabulary, most of the activation memory.
        """
        embeds = self.embed(input_ids, pixel_values, image_features)
        kwargs = dict(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
        if logits_at is None:
            return self.language_model(**kwargs).logits
        # The same path as the causal-LM head: decoder, then head, then (Gemma) soft cap.
        hidden = self.language_model.get_decoder()(**kwargs).last_hidden_state
        logits = self.language_model.get_output_embeddings()(hidden[logits_at])
        cap = getattr(self.language_model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None,
        *,
        max_new_tokens: int,
        eos_token_id: int,
        pad_token_id: int,
    ) -> torch.Tensor:
        """Greedy decoding from left-padded prompts; returns only the new tokens."""
        embeds = self.embed(input_ids, pixel_values)
        return self.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
