"""Locally written VLM backbones: a SmolVLM config, tokenizer and processor, no weights.

SmolVLA resolves its VLM backbone with ``AutoConfig``/``AutoProcessor``/``AutoTokenizer``
``.from_pretrained(vlm_model_name)``. Pointing ``vlm_model_name`` at an absolute local
folder written here makes the whole policy build offline. Two backbones exist:

- ``tiny``: ~0.5M parameters, builds in seconds, so the federated pipeline can run and be
  tested on any laptop;
- ``smolvla-size``: SmolVLM2-500M's architecture (the backbone of ``lerobot/smolvla_base``)
  with a small tokenizer, randomly initialised, to measure real-size costs (memory, start-up,
  wire bytes) without the hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# SmolVLM's processor looks these special tokens up on the tokenizer by attribute.
SPECIAL_TOKENS = {
    "fake_image_token": "<fake_token_around_image>",
    "image_token": "<image>",
    "global_image_token": "<global-img>",
    "end_of_utterance_token": "<end_of_utterance>",
}
# Sentences the BPE tokenizer is trained on: enough to tokenize SO-101 task strings.
CORPUS = [
    "pick up the red cube and place it in the bin",
    "push the green block to the left side of the table",
    "grasp the blue cube and lift it",
    "put the yellow cube on the white plate",
    "move the arm to the right and open the gripper",
    "stack the purple block on the orange block",
    "grab the pen and put it into the cylinder",
    "turn to the right side, then close the gripper",
    "0 1 2 3 4 5 6 7 8 9 . , : ; ! ? ( ) - _",
]
IMAGE_SIZE = 64  # the tiny VLM's and the embedded datasets' image size
SPEC_VERSION = 2


@dataclass(frozen=True)
class VlmSpec:
    """Everything that defines a locally written VLM; its digest names the cache folder."""

    name: str
    image_size: int
    patch_size: int
    scale_factor: int
    text: dict
    vision: dict
    vocab_size: int | None = None  # None: the local tokenizer's size

    def digest(self) -> str:
        """Short hash of the spec and tokenizer inputs: a changed spec gets a new folder, never a stale one."""
        spec = [SPEC_VERSION, SPECIAL_TOKENS, CORPUS, asdict(self)]
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


VLMS = {spec.name: spec for spec in (
    VlmSpec("tiny", image_size=IMAGE_SIZE, patch_size=16, scale_factor=2,
            text={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512},
            vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}),
    # SmolVLM2-500M-Video-Instruct's config, with its vocabulary size whatever the local tokenizer's.
    VlmSpec("smolvla-size", image_size=512, patch_size=16, scale_factor=4, vocab_size=49280,
            text={"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15,
                  "num_key_value_heads": 5, "head_dim": 64, "rms_norm_eps": 1e-5,
                  "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
                  "tie_word_embeddings": False, "max_position_embeddings": 8192},
            vision={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12}),
)}


def cache_root() -> Path:
    """Where zk0 keeps generated artefacts (local VLMs, embedded datasets)."""
    return Path(os.environ.get("ZK0_CACHE", Path.home() / ".cache" / "zk0")).expanduser().resolve()


def train_tokenizer():
    """A byte-level BPE tokenizer with SmolVLM's special tokens, trained in a second on :data:`CORPUS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", *SPECIAL_TOKENS.values()]
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                                   extra_special_tokens=dict(SPECIAL_TOKENS))


def write_vlm(spec: VlmSpec, folder: Path) -> None:
    """Write ``spec``'s config, processor and tokenizer into ``folder``."""
    from transformers import (LlamaConfig, SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor,
                              SmolVLMVideoProcessor)
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    tokenizer = train_tokenizer()
    text = LlamaConfig(vocab_size=spec.vocab_size or len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       **spec.text)
    vision = SmolVLMVisionConfig(image_size=spec.image_size, patch_size=spec.patch_size, **spec.vision)
    config = SmolVLMConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                           scale_factor=spec.scale_factor,
                           image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image_token"]))
    image_processor = SmolVLMImageProcessor(
        do_resize=True, size={"longest_edge": spec.image_size}, do_image_splitting=False,
        max_image_size={"longest_edge": spec.image_size})
    seq_len = (spec.image_size // spec.patch_size) ** 2 // spec.scale_factor**2
    processor = SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=SmolVLMVideoProcessor(), image_seq_len=seq_len)
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def ensure_vlm(name: str) -> Path:
    """Return the absolute folder of the local VLM ``name`` (see :data:`VLMS`), writing it once, atomically."""
    spec = VLMS[name]
    folder = cache_root() / f"{spec.name}-vlm-{spec.digest()}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{spec.name}-vlm-", dir=folder.parent))
    write_vlm(spec, staging)
    try:
        staging.rename(folder)
    except OSError:  # another process won the race; its folder is identical
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def ensure_tiny_vlm() -> Path:
    """The tiny VLM's folder (see :func:`ensure_vlm`)."""
    return ensure_vlm("tiny")
