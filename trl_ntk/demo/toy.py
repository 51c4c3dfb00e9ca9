"""Embedded offline default: a byte-level BPE tokenizer with a ChatML template, a tiny Qwen2 model, and synthetic
preference and arithmetic data with real structure. Built once, warmed up briefly on CPU, and cached on disk, so the
demo, the examples and the tests run with no network and no model hub.

The pieces live by role: `toy_tokenizer.py` (special tokens, chat template, BPE training), `toy_data.py` (facts,
datasets, reward, warm-up corpora), `toy_model.py` (recipe, random model, warm-up loop, cache); this module gathers
their public names.

Usage:

```python
from trl import DPOConfig, DPOTrainer
from trl_ntk.demo.toy import model_and_tokenizer, preference_dataset

model, tokenizer = model_and_tokenizer()  # warm model, loaded from its cache folder
trainer = DPOTrainer(model=model, args=DPOConfig(output_dir="out"), train_dataset=preference_dataset(),
                     processing_class=tokenizer)
```
"""

from trl_ntk.demo.toy_data import (
    CHOSEN_SLOT_WEIGHTS,
    PLAIN_PROMPT,
    final_answer,
    math_dataset,
    math_reward,
    preference_dataset,
    rewards_by_final_answer,
)
from trl_ntk.demo.toy_model import (
    RECIPE_VERSION,
    Stage,
    default_cache_dir,
    model_and_tokenizer,
    tiny_random_model,
    toy_cache_path,
)
from trl_ntk.demo.toy_tokenizer import (
    CHAT_TEMPLATE,
    IM_END,
    IM_START,
    MAX_LENGTH,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    VOCAB_SIZE,
    train_tokenizer,
)

__all__ = [
    "CHAT_TEMPLATE",
    "CHOSEN_SLOT_WEIGHTS",
    "IM_END",
    "IM_START",
    "MAX_LENGTH",
    "PAD_TOKEN",
    "PLAIN_PROMPT",
    "RECIPE_VERSION",
    "SPECIAL_TOKENS",
    "VOCAB_SIZE",
    "Stage",
    "default_cache_dir",
    "final_answer",
    "math_dataset",
    "math_reward",
    "model_and_tokenizer",
    "preference_dataset",
    "rewards_by_final_answer",
    "tiny_random_model",
    "toy_cache_path",
    "train_tokenizer",
]
