"""The loop's own pieces: the model is called without an attention mask (right padding + causal attention gives
the same loss), padding-free and packed batches give each example the loss it has alone, the log window's token
and padding counts, and the phase timer."""
from __future__ import annotations

import torch

import datasets
import pytest

from recipes.data import IGNORE_INDEX, make_collate_fn, pack_sequences
from recipes.finetune import LogWindow, model_inputs
from recipes.metrics import PhaseTimer

from conftest import relative_error


def examples_of(vocab: int, lengths=(12, 7, 3), prompt_share: float = 0.5) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    examples = []
    for length in lengths:
        ids = torch.randint(1, vocab, (length,), generator=generator).tolist()
        masked = int(length * prompt_share)
        labels = [IGNORE_INDEX] * masked + ids[masked:]
        examples.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * length})
    return examples


def right_padded_batch(vocab: int) -> dict:
    return make_collate_fn(pad_token_id=0)(examples_of(vocab))


def test_loss_without_the_mask_equals_the_masked_loss_on_right_padded_batches(tiny_llama):
    model = tiny_llama()
    batch = right_padded_batch(model.config.vocab_size)
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # the batch really has padding
    with torch.no_grad():
        masked = model(**batch).loss
        unmasked = model(**model_inputs(batch)).loss
        # The mask matters where a pad would be attended: left padding changes the loss, so the check can fail.
        flipped = {k: v.flip(1) for k, v in batch.items()}
        left_masked = model(**flipped).loss
        left_unmasked = model(**model_inputs(flipped)).loss
    assert "attention_mask" not in model_inputs(batch)
    torch.testing.assert_close(unmasked, masked, rtol=1e-6, atol=1e-6)
    assert abs(left_unmasked.item() - left_masked.item()) > 1e-3


def test_padding_free_batch_is_one_row_with_restarting_positions_and_the_padded_batch_loss(tiny_llama):
    model = tiny_llama()
    # prompt_share 0: every label is a target, so the first label of each example is the one to drop.
    examples = examples_of(model.config.vocab_size, lengths=(12, 7, 3, 9), prompt_share=0.0)
    padded = make_collate_fn(pad_token_id=0)(examples)
    flat = make_collate_fn(pad_token_id=0, pad_to_multiple_of=8, padding_free=True)(examples)
    assert flat["input_ids"].shape == (1, 32)  # 31 tokens rounded up to 8: one pad, against 17 in the padded batch
    assert flat["position_ids"][0].tolist() == [*range(12), *range(7), *range(3), *range(9), 0]
    assert flat["attention_mask"].sum() == padded["attention_mask"].sum() == 31
    starts = [0, 12, 19, 22, 31]  # every example's first label and the pad's are not targets
    assert (flat["labels"][0, starts] == IGNORE_INDEX).all() and (flat["labels"] != IGNORE_INDEX).sum() == 31 - 4
    with torch.no_grad():
        reference = model(**model_inputs(padded)).loss
        loss = model(**model_inputs(flat)).loss
        # Without the restarting positions the examples would see each other: a different loss (the check can fail).
        leaky = model(input_ids=flat["input_ids"], labels=flat["labels"]).loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    assert abs(leaky.item() - reference.item()) > 1e-3


def test_packed_rows_keep_attention_inside_each_example(tiny_llama):
    model = tiny_llama()
    examples = examples_of(model.config.vocab_size, lengths=(9, 6, 5, 4))
    packed = pack_sequences(datasets.Dataset.from_list(examples), 10)
    assert [len(row) for row in packed["input_ids"]] == [9, 10, 5]  # [9] [6, 4] [5]: one row holds two examples
    assert packed[1]["position_ids"] == [*range(6), *range(4)]
    rows = make_collate_fn(pad_token_id=0)(list(packed))
    assert rows["position_ids"][2].tolist() == list(range(10))  # pads continue the last example's positions
    alone = make_collate_fn(pad_token_id=0)(examples)
    with torch.no_grad():
        loss = model(**model_inputs(rows)).loss
        reference = model(**model_inputs(alone)).loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)


def test_log_window_counts_real_tokens_and_padding():
    window = LogWindow(torch.device("cpu"))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    # Each micro-batch's loss is its share of the step's token mean: the step's loss is their sum.
    window.add_micro_batch(torch.tensor(1.0), mask)
    window.add_micro_batch(torch.tensor(2.0), torch.ones(2, 4, dtype=torch.long))
    window.end_step()
    window.add_micro_batch(torch.tensor(5.0), mask)
    window.end_step()
    line = window.reduce()
    assert line["loss"] == 4.0  # the mean of the two steps' losses, 3 and 5
    assert line["tokens"] == 10.0  # per optimizer step: (6 + 8 + 6) / 2
    assert abs(line["padding_share"] - 4 / 24) < 1e-9
    assert line["tokens_per_s"] > 0
    window.add_micro_batch(torch.tensor(1.0), mask)
    window.end_step()
    assert window.reduce()["tokens"] == 6.0  # counts start again after each line


def test_phase_timer_charges_each_phase_per_step():
    clock = iter([0.0, 1.0, 3.0, 6.0, 6.5, 7.0, 8.0, 10.0, 13.0, 13.5, 14.0])
    timer = PhaseTimer(torch.device("cpu"), enabled=True)
    timer.clock = lambda: next(clock)
    timer.last = timer.clock()
    for _ in range(2):
        for phase in ("data", "forward", "backward", "optimizer", "log"):
            timer.lap(phase)
    assert timer.reduce() == {"data": 1.0, "forward": 2.0, "backward": 3.0, "optimizer": 0.5, "log": 0.5}
    off = PhaseTimer(torch.device("cpu"), enabled=False)
    off.lap("data")
    assert off.reduce() == {}


def test_varlen_attention_gives_each_example_its_own_attention(tiny_llama):
    from recipes import packed_attention

    model = tiny_llama()
    examples = examples_of(model.config.vocab_size, lengths=(12, 7, 3, 9), prompt_share=0.0)
    flat = make_collate_fn(pad_token_id=0, pad_to_multiple_of=8, padding_free=True)(examples)
    assert flat["cu_seq_lens_q"].tolist() == [0, 12, 19, 22, 31, 32] and flat["max_length_q"] == 12
    padded = make_collate_fn(pad_token_id=0)(examples)
    with torch.no_grad():
        reference = model(**model_inputs(padded)).loss
        packed_attention.use_attention(model, packed_attention.resolve_attention("varlen", True, torch.device("cpu")))
        assert model.config._attn_implementation == packed_attention.VARLEN
        loss = model(**model_inputs(flat)).loss
        # Without boundaries the same implementation is plain SDPA: a padded batch gives its usual loss.
        unchanged = model(**model_inputs(padded)).loss
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unchanged, reference, rtol=1e-6, atol=1e-6)
    # Left-padded generation (the end-of-training sample answers) still gets its mask: the same tokens as SDPA's.
    ids, mask = torch.tensor([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6]]), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    sdpa = tiny_llama().generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(generated, sdpa)


def test_attention_choice_is_varlen_only_for_padding_free_batches_on_a_gpu():
    from recipes.packed_attention import VARLEN, AttentionConfigError, resolve_attention

    assert resolve_attention("auto", True, torch.device("cuda")) == VARLEN
    assert resolve_attention("auto", False, torch.device("cuda")) == "sdpa"
    assert resolve_attention("auto", True, torch.device("cpu")) == "sdpa"
    assert resolve_attention("eager", True, torch.device("cuda")) == "eager"
    with pytest.raises(AttentionConfigError, match="model.attention='flash': choose one of auto, sdpa"):
        resolve_attention("flash", True, torch.device("cuda"))


def answers_of_very_different_lengths(vocab: int) -> list[dict]:
    """Eight examples: the same prompt length, answers of 1 to 40 learned tokens (short and long alternate, so
    every split mixes them differently)."""
    generator = torch.Generator().manual_seed(2)
    examples = []
    for answer in (40, 1, 25, 2, 3, 33, 5, 18):
        prompt = torch.randint(1, vocab, (6,), generator=generator).tolist()
        ids = prompt + torch.randint(1, vocab, (answer,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * len(prompt) + ids[len(prompt):],
                         "attention_mask": [1] * len(ids)})
    return examples


def adapted_model(tiny_llama):
    """The tiny LLaMA with LoRA adapters (no dropout) whose factors are all non-zero, so every one has gradients."""
    import selora

    model = tiny_llama()
    selora.apply(model, selora.LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    return model


def first_step(tiny_llama, examples, micro_batch_size: int, padding_free: bool):
    """One optimizer step of the plain engine over ``examples`` split into micro-batches of ``micro_batch_size``:
    (the gradients the optimizer saw, the step's logged loss, the adapter after the step)."""
    from launch.config import resolve
    from recipes.engine import PlainEngine
    from recipes.finetune import optimizer_step

    accumulation = len(examples) // micro_batch_size
    cfg = resolve("llama_lora", [f"train.micro_batch_size={micro_batch_size}", "train.warmup_steps=0",
                                 f"train.gradient_accumulation_steps={accumulation}"])
    engine = PlainEngine(adapted_model(tiny_llama), cfg, total_steps=10)
    engine.train()
    seen = []
    engine.optimizer.register_step_pre_hook(lambda *_: seen.append([p.grad.clone() for p in engine.params]))
    collate = make_collate_fn(pad_token_id=0, padding_free=padding_free)
    micro_batches = [collate(examples[i:i + micro_batch_size]) for i in range(0, len(examples), micro_batch_size)]
    window = LogWindow(torch.device("cpu"))
    optimizer_step(engine, micro_batches, torch.device("cpu"), window, PhaseTimer(torch.device("cpu"), False))
    window.end_step()
    return seen[0], window.reduce()["loss"], [p.detach().clone() for p in engine.params]


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_same_examples_split_8x1_or_2x4_give_the_same_gradients_and_loss(tiny_llama, padding_free):
    """The step's loss is the mean over all of its learned tokens, whatever the micro-batch split: 8 examples as one
    micro-batch or as 4 accumulated micro-batches of 2 give the same gradients, loss and updated adapter. (A mean of
    micro-batch means, what the loop did before, weighs the 1-token answer's token like 40 of the long one's.)"""
    examples = answers_of_very_different_lengths(tiny_llama().config.vocab_size)
    whole_grads, whole_loss, whole_after = first_step(tiny_llama, examples, 8, padding_free)
    split_grads, split_loss, split_after = first_step(tiny_llama, examples, 2, padding_free)
    reference = adapted_model(tiny_llama)  # the token mean over all eight examples, straight from the model
    with torch.no_grad():
        expected = reference(**model_inputs(make_collate_fn(pad_token_id=0)(examples))).loss.item()
    assert abs(whole_loss - expected) < 1e-5 and abs(split_loss - expected) < 1e-5
    for whole, split in zip(whole_grads, split_grads):
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)
    for whole, split in zip(whole_after, split_after):
        torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-7)
    # The check can fail: the gradient of the mean of the four micro-batch means (the loop before) is another one.
    collate = make_collate_fn(pad_token_id=0, padding_free=padding_free)
    for i in range(0, 8, 2):
        (reference(**model_inputs(collate(examples[i:i + 2]))).loss / 4).backward()
    old = torch.cat([p.grad.flatten() for p in reference.parameters() if p.requires_grad])
    assert relative_error(old, torch.cat([g.flatten() for g in whole_grads])) > 1e-2


def test_a_step_takes_its_micro_batches_ahead_and_resumes_at_the_next_one():
    """The loop takes a step's micro-batches before its first forward; the position after them (also across an
    epoch end with a short last micro-batch) is where a resumed run continues: the same micro-batches follow."""
    from recipes.finetune import DataOrder

    dataset = [{"input_ids": [i + 1], "labels": [i + 1], "attention_mask": [1]} for i in range(10)]
    collate = make_collate_fn(pad_token_id=0)
    order = DataOrder(len(dataset), 4, rank=0, world_size=1, seed=3)  # micro-batches of 4, 4 and 2 per epoch
    straight = order.micro_batches(dataset, collate, 0, 0)
    positions, steps = [], []
    for _ in range(4):  # steps of 2 micro-batches: the second and fourth cross an epoch end
        taken = [next(straight) for _ in range(2)]
        positions.append(taken[-1][:2])
        steps.append([b["input_ids"].flatten().tolist() for _, _, b in taken])
    assert positions == [(0, 2), (1, 1), (2, 0), (2, 2)]
    assert [len(ids) for ids in steps[1]] == [2, 4]  # the epoch's short last micro-batch, then the next epoch's
    for k in range(3):
        epoch, start = positions[k]
        resumed = order.micro_batches(dataset, collate, epoch, start)
        assert [next(resumed)[2]["input_ids"].flatten().tolist() for _ in range(2)] == steps[k + 1]
