"""The toy's tokenizer: special tokens, the ChatML template, and a byte-level BPE trained on the synthetic corpus
(`toy_data.tokenizer_corpus`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import Qwen2Tokenizer

VOCAB_SIZE = 600
"""Size of the toy tokenizer's vocabulary (256 bytes + BPE merges + 3 special tokens); `len(tokenizer)`."""

MAX_LENGTH = 256
"""`model_max_length` of the tokenizer and `max_position_embeddings` of the model."""

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>\\n' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, no default system message. The assistant's
content and its `<|im_end|>\\n` sit inside `{% generation %}` markers, so TRL's `assistant_only_loss` masks work and
the end-of-turn token is trained."""


def train_tokenizer(texts: Sequence[str]) -> Qwen2Tokenizer:
    """Byte-level BPE with `VOCAB_SIZE` entries trained on `texts` (the synthetic corpus), as a `Qwen2Tokenizer`.

    The normalizer (NFC) and pre-tokenizer (Qwen2's split regex, one token per digit, then byte-level) are Qwen2's
    own, because `AutoTokenizer` rebuilds a `Qwen2Tokenizer` from the saved vocabulary and merges for a folder whose
    model is a Qwen2: training with anything else would tokenize differently after a save / load round trip.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(backend.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=trained["vocab"],
        merges=[tuple(pair) for pair in trained["merges"]],
        unk_token=PAD_TOKEN,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=[IM_START],
        model_max_length=MAX_LENGTH,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )
    if len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"the toy tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}; grow the corpus")
    return tokenizer
