"""The loop's own pieces: the model is called without an attention mask (right padding + causal attention gives
the same loss), the log window's token and padding counts, and the phase timer."""
from __future__ import annotations

import torch

from recipes.data import IGNORE_INDEX, make_collate_fn
from recipes.finetune import LogWindow, model_inputs
from recipes.metrics import PhaseTimer


def right_padded_batch(vocab: int) -> dict:
    generator = torch.Generator().manual_seed(1)
    examples = []
    for length in (12, 7, 3):
        ids = torch.randint(1, vocab, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2:]
        examples.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * length})
    return make_collate_fn(pad_token_id=0)(examples)


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


def test_log_window_counts_real_tokens_and_padding():
    window = LogWindow(torch.device("cpu"))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    window.add_micro_batch(torch.tensor(2.0), mask)
    window.add_micro_batch(torch.tensor(4.0), torch.ones(2, 4, dtype=torch.long))
    window.end_step()
    line = window.reduce()
    assert line["loss"] == 3.0
    assert line["tokens"] == 14.0
    assert abs(line["padding_share"] - 2 / 16) < 1e-9
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
