"""Pre-train the quality study's base: a small LLaMA on real English text (bench/corpus.py), with a byte-level
BPE tokenizer trained on the same text. Deterministic from --seed (a fixed number of steps, not a time budget).

    python bench/pretrain_base.py --corpus .quality/corpus.txt --out .quality/base --steps 1500
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

SPECIAL = ["<unk>", "<s>", "</s>", "<pad>"]
# 23M parameters (tied embeddings): its bf16 checkpoint (~46 MB) still travels to a GPU machine with the repo.
SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True)


def train_tokenizer(text: str, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default=".quality/corpus.txt")
    parser.add_argument("--out", default=".quality/base")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = Path(args.corpus).read_text()
    tokenizer = train_tokenizer(text, args.vocab)
    encoded = tokenizer(text.split("\n\n"), add_special_tokens=False)["input_ids"]  # batched: parallel in Rust
    ids = torch.tensor([i for paragraph in encoded
                        for i in [tokenizer.bos_token_id] + paragraph + [tokenizer.eos_token_id]])
    print(f"corpus: {len(ids)} tokens", flush=True)
    held_out = ids[-len(ids) // 50:]  # last 2% of the stream: the pre-training validation loss
    ids = ids[: -len(ids) // 50].to(device)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **SHAPE)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    start, log = time.time(), []
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=generator)
        batch = torch.stack([ids[o:o + args.seq] for o in offsets.tolist()])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 500 == 0 or step == args.steps:
            log.append((step, loss.item()))
            print(f"step {step} loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        windows = held_out[: (len(held_out) // args.seq) * args.seq].view(-1, args.seq)[:64].to(device)
        val = model(input_ids=windows, labels=windows).loss.item()
    out = Path(args.out)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="12MB")
    tokenizer.save_pretrained(out)
    (out / "pretraining.txt").write_text(
        f"steps {args.steps}, batch {args.batch} x {args.seq} tokens, {sum(p.numel() for p in model.parameters())} "
        f"parameters, corpus {len(ids) + len(held_out)} tokens, {time.time() - start:.0f} s on {device}; "
        f"final train loss {log[-1][1]:.3f}, held-out loss {val:.3f}\n")
    print((out / "pretraining.txt").read_text())


if __name__ == "__main__":
    main()
