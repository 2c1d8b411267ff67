"""The embedded tiny VLM: a SmolVLM config, tokenizer and processor written locally.

SmolVLA resolves its VLM backbone with ``AutoConfig``/``AutoProcessor``/``AutoTokenizer``
``.from_pretrained(vlm_model_name)``. Pointing ``vlm_model_name`` at an absolute local
folder written here makes the whole policy build offline, in seconds, with ~0.5M
parameters, so the federated pipeline can run and be tested on any laptop.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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
IMAGE_SIZE = 64
PATCH_SIZE = 16
SCALE_FACTOR = 2
TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 2}
SPEC_VERSION = 1


def _spec_digest() -> str:
    """Digest of everything that defines the tiny VLM, naming its cache folder."""
    spec = [SPEC_VERSION, SPECIAL_TOKENS, CORPUS, IMAGE_SIZE, PATCH_SIZE, SCALE_FACTOR, TEXT, VISION]
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def cache_root() -> Path:
    """Where zk0 keeps generated artefacts (tiny VLM, embedded datasets)."""
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


def _write(folder: Path) -> None:
    from transformers import (LlamaConfig, SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor,
                              SmolVLMVideoProcessor)
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig

    tokenizer = train_tokenizer()
    text = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, **TEXT)
    vision = SmolVLMVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION)
    config = SmolVLMConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                           scale_factor=SCALE_FACTOR,
                           image_token_id=tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS["image_token"]))
    image_processor = SmolVLMImageProcessor(
        do_resize=True, size={"longest_edge": IMAGE_SIZE}, do_image_splitting=False,
        max_image_size={"longest_edge": IMAGE_SIZE})
    seq_len = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
    processor = SmolVLMProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=SmolVLMVideoProcessor(), image_seq_len=seq_len)
    config.save_pretrained(folder)
    processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def ensure_tiny_vlm() -> Path:
    """Return the absolute folder of the tiny VLM, writing it once (atomically) if missing."""
    folder = cache_root() / f"tiny-vlm-{_spec_digest()}"
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-vlm-", dir=folder.parent))
    _write(staging)
    try:
        staging.rename(folder)
    except OSError:  # another process won the race; its folder is identical
        shutil.rmtree(staging, ignore_errors=True)
    return folder
