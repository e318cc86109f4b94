"""Regenerates configs/tokenizer/: the byte-level BPE tokenizer of the default tiny model, trained with the
`tokenizers` library on the shipped default data (a real checkpoint brings its own tokenizer).

    python recipes/build_tokenizer.py
"""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 4096
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
# Renders chat records; the assistant turn is what the model learns (recipes/data.py masks the rest).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def texts() -> list[str]:
    out = []
    for name in ("default_instructions.jsonl", "default_eval.jsonl", "example_chat.jsonl"):
        for line in (ROOT / "configs" / "data" / name).read_text().splitlines():
            record = json.loads(line)
            if "messages" in record:
                out += [m["content"] for m in record["messages"]]
            else:
                out += [record.get("instruction", ""), record.get("input", ""), record.get("output", "")]
    return out


def main() -> None:
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    out = ROOT / "configs" / "tokenizer"
    fast.save_pretrained(out)
    print(f"saved a {len(fast)}-token tokenizer to {out}")


if __name__ == "__main__":
    main()
