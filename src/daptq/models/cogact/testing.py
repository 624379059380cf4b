"""Offline stand-ins for what a real CogACT run ships, so tests and demos build tiny runs without downloads:
a word-level tokenizer laid out like Llama's (``<s>`` 1, ``</s>`` 2, the empty token 3 appended before the
cognition token, ``<PAD>`` 0) and dataset statistics in the original's format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from daptq.models.cogact.checkpoint import save_cogact_run
from daptq.models.cogact.config import CogACTConfig
from daptq.models.cogact.model import CogACT

SPECIALS = ("<PAD>", "<s>", "</s>", "\u2581", "<unk>")
WORDS = (
    "in out what action should the robot take to ? : pick place put open close push pull move lift drawer "
    "cup can coke block red green blue spoon towel carrot plate sink left right up down on into of a"
).split()


def tiny_tokenizer() -> Any:
    """A ``PreTrainedTokenizerFast`` over ~50 words (unknown words map to ``<unk>``), prefixing ``<s>``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate((*SPECIALS, *WORDS))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<PAD>"
    )


def tiny_statistics(key: str = "bridge_orig") -> dict[str, Any]:
    """``dataset_statistics.json`` content for one dataset (BridgeData-like bounds; the gripper unmasked)."""
    return {
        key: {
            "action": {
                "q01": [-0.03, -0.04, -0.03, -0.1, -0.1, -0.2, 0.0],
                "q99": [0.03, 0.04, 0.04, 0.1, 0.1, 0.2, 1.0],
                "mask": [True, True, True, True, True, True, False],
            },
            "num_transitions": 1000,
            "num_trajectories": 10,
        }
    }


def tiny_cogact(seed: int = 0, **overrides: Any) -> CogACT:
    """A tiny random CogACT whose zero-initialized DiT output layer is re-drawn, so it predicts non-zero noise
    (as a trained model does) and quantization errors are visible in its actions."""
    torch.manual_seed(seed)
    model = CogACT(CogACTConfig.tiny(**overrides)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.action_model.net.final_layer.linear.weight, std=0.2)
    return model


def write_tiny_run(directory: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """A complete tiny CogACT run directory (config, statistics, checkpoint, tokenizer) at ``directory``."""
    return save_cogact_run(tiny_cogact(seed, **overrides), directory, tiny_statistics(), tiny_tokenizer())


def write_random_streamed_cogact(
    config: CogACTConfig,
    directory: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_bytes: int = 1 << 30,
) -> int:
    """A random-weight CogACT of any size (the released 7B shape included) written as a streamed directory
    (``streamed.load_streamed_cogact`` reads it) without ever holding the model: it is built on the meta
    device and each shard's tensors are drawn when that shard is written (norm weights 1, biases 0, the
    rest N(0, 0.02^2), each from a generator seeded by its name). Written into a temporary sibling renamed
    into place last, so ``directory`` is absent or complete; an existing one is refused. Returns the bytes
    written."""
    import os
    import shutil
    import tempfile
    import zlib

    from daptq.models.cogact.streamed import write_streamed_cogact_state

    with torch.device("meta"):
        model = CogACT(config)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}

    def draw(name: str, like: torch.Tensor) -> torch.Tensor:
        if not like.is_floating_point():
            return torch.zeros(like.shape, dtype=like.dtype)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias":
            return torch.zeros(like.shape, dtype=like.dtype)
        if like.dim() == 1 and "norm" in name:
            return torch.ones(like.shape, dtype=like.dtype)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(like.shape, generator=g) * 0.02).to(like.dtype)

    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} exists: write_random_streamed_cogact writes a new directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write_streamed_cogact_state(state, config, tmp, max_shard_bytes, materialize=draw)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sum(t.numel() * t.element_size() for t in state.values())
