"""selora.decode: one batched transform per factor shape per top-level forward, rows valid only inside that
forward; the same outputs and gradients as factor-by-factor decoding; the cases that used to serve stale rows;
checkpoint recomputation that replays the forward's own rows (selora.enable_gradient_checkpointing)."""
import pytest
import torch

import selora
from selora.bases.basis import Basis

from conftest import build_tiny_llama, relative_error


def seeded_model(basis="haar", dtype=torch.float32, **config):
    model = selora.apply(build_tiny_llama().to(dtype), selora.SeLoRAConfig(r=4, basis=basis, **config))
    with torch.no_grad():  # a non-zero B, so every factor shapes the output and receives a gradient
        for layer in selora.adapter_layers(model).values():
            layer.lora_B.param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return model


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def loss_and_grads(model, ids, call=None):
    model.zero_grad(set_to_none=True)
    loss = (call or (lambda: model(ids, labels=ids).loss))()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainable(model).items()}


def assert_same(first, second, tolerance=1e-6):
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    assert relative_error(loss_b, loss_a) < tolerance
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name].abs().sum() > 0, f"{name} got no gradient (a dropped adapter)"
        assert relative_error(grads_b[name], grads_a[name]) < tolerance, name


@pytest.mark.parametrize("basis, dora", [("haar", True), ("fft2", False), ("dct_rows", False)])
def test_batched_decode_matches_factor_by_factor(basis, dora, input_ids, monkeypatch):
    """Per-parameter gradients at 1e-6 (fp32), with HF's own activation checkpointing (no selora context_fn: the
    fallback in which each factor decodes itself in the recomputation) and two micro-batches; and one transform per
    factor-shape group per forward against one per factor."""
    calls = []
    original = Basis.decode
    monkeypatch.setattr(Basis, "decode", lambda self, e, *a: calls.append(e.shape) or original(self, e, *a))

    def run(batched: bool):
        model = seeded_model(basis, use_dora=dora)
        model.selora_decoder.batched = batched
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        model.zero_grad(set_to_none=True)
        calls.clear()
        losses = []
        for micro_batch in (input_ids[:1], input_ids[1:]):
            loss = model(micro_batch, labels=micro_batch).loss
            loss.backward()
            losses.append(loss.detach())
        forward_calls = len(calls)
        return (torch.stack(losses), {n: p.grad.clone() for n, p in trainable(model).items()}), forward_calls, model

    (plain, plain_calls, _), (batched, batched_calls, model) = run(False), run(True)
    assert_same(plain, batched)
    groups = len(model.selora_decoder.groups())
    factors = len(model.selora_decoder.factors)
    # batched: one per group per micro-batch, plus each factor once more in checkpoint recomputation
    assert batched_calls == 2 * (groups + factors)
    assert plain_calls == 2 * 2 * factors  # plain: each factor decodes itself in forward and in recomputation
    assert groups < factors


def test_batched_decode_matches_an_explicitly_written_model(input_ids):
    """Against a copy of the model in which every adapter is a plain LoRA holding the decoded factors: the
    decode path changes nothing (outputs at 1e-6), so no adapter can be dropped or mixed up."""
    model = seeded_model("db4")
    lora = selora.apply(build_tiny_llama(), selora.LoRAConfig(r=4))
    with torch.no_grad():
        for (name, spectral), (_, dense) in zip(selora.adapter_layers(model).items(), selora.adapter_layers(lora).items()):
            A, B = spectral.factor_matrices()
            dense.lora_A.weight.copy_(A)
            dense.lora_B.weight.copy_(B.T)
        torch.testing.assert_close(model(input_ids).logits, lora(input_ids).logits, rtol=1e-6, atol=1e-6)


def test_submodule_after_a_no_grad_top_level_forward(input_ids):
    """The case that failed: ``with torch.no_grad(): model(ids)`` then forward + backward through model.model."""
    model, reference = seeded_model(), seeded_model()

    def through_body(m):
        hidden = m.model(input_ids).last_hidden_state
        return hidden.pow(2).mean()

    expected = loss_and_grads(reference, input_ids, lambda: through_body(reference))
    with torch.no_grad():
        model(input_ids)
    assert_same(expected, loss_and_grads(model, input_ids, lambda: through_body(model)))


def test_submodule_after_a_top_level_forward_and_backward(input_ids):
    """The other case that failed ("backward through the graph a second time"): a top-level forward + backward,
    then a submodule forward + backward, then the top level again — all with gradients equal to fresh models'."""
    model = seeded_model()
    top = loss_and_grads(model, input_ids)
    body = loss_and_grads(model, input_ids, lambda: model.model(input_ids).last_hidden_state.pow(2).mean())
    again = loss_and_grads(model, input_ids)
    fresh_body = seeded_model()
    assert_same(top, again, tolerance=1e-7)
    assert_same(loss_and_grads(fresh_body, input_ids, lambda: fresh_body.model(input_ids).last_hidden_state.pow(2).mean()),
                body)


def test_rows_never_outlive_their_forward(input_ids):
    """After a forward (also one that raised) no factor holds rows; after an optimizer step a direct factor call
    and the next forward see the new entries."""
    model = seeded_model()
    decoder = model.selora_decoder
    model(input_ids)
    assert all(f.decoded is None for f in decoder.factors) and decoder.depth == 0
    with pytest.raises(Exception):
        model(input_ids.float())  # embedding lookup with float ids raises inside the forward
    assert all(f.decoded is None for f in decoder.factors) and decoder.depth == 0
    optimizer = torch.optim.SGD(list(trainable(model).values()), lr=1.0)
    loss_and_grads(model, input_ids)
    factor = decoder.factors[0]
    before = factor().detach().clone()
    optimizer.step()
    after = factor().detach()
    expected = factor.basis.decode(factor.coefficients.detach(), factor.index_set.indices, factor.rows, factor.length)
    assert not torch.equal(before, after) and torch.equal(after, expected)


def test_bf16_rows_come_in_the_compute_dtype(input_ids):
    """A bf16 model gets bf16 rows from the batched decode (cast once per group), and the same loss as
    factor-by-factor decoding up to bf16 rounding; the (float32) entries get float32 gradients."""
    def run(batched):
        model = seeded_model(dtype=torch.bfloat16)
        model.selora_decoder.batched = batched
        model(input_ids)  # the first forward teaches each factor its compute dtype
        seen = {}
        first = model.selora_decoder.factors[0]
        def look(*_):  # returns None: a pre-hook's return value would replace the layer's input
            seen.setdefault("dtype", first.decoded.dtype if first.decoded is not None else None)

        hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(look)
        loss, grads = loss_and_grads(model, input_ids)
        hook.remove()
        return loss.float(), grads, seen["dtype"]

    (plain_loss, plain_grads, plain_dtype), (loss, grads, dtype) = run(False), run(True)
    assert plain_dtype is None and dtype == torch.bfloat16
    assert relative_error(loss, plain_loss) < 1e-2
    for name in grads:
        assert grads[name].dtype == torch.float32
        assert relative_error(grads[name].float(), plain_grads[name].float()) < 5e-2


def test_reentrant_checkpointing_gives_the_uncheckpointed_gradients(input_ids):
    """Reentrant checkpointing re-runs each block with gradients in backward: the factors decode themselves there
    and gradients flow through the recomputed graph; they must equal an uncheckpointed model's, per parameter."""
    reference = loss_and_grads(seeded_model(), input_ids)
    model = seeded_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()  # frozen embeddings: the checkpointed blocks need an input that requires grad
    model.train()
    assert_same(reference, loss_and_grads(model, input_ids))


# ----- checkpoint recomputation replays the forward's rows (selora.enable_gradient_checkpointing) -----------------
def count_decodes(monkeypatch) -> list:
    """Every basis decode from now on appends its entries' shape to the returned list."""
    calls = []
    original = Basis.decode
    monkeypatch.setattr(Basis, "decode", lambda self, e, *a: calls.append(e.shape) or original(self, e, *a))
    return calls


def checkpointed(model, how="selora"):
    """``model`` in training mode with selora's checkpointing, HF's plain one ("hf"), or none (None)."""
    if how == "selora":
        selora.enable_gradient_checkpointing(model)
    elif how == "hf":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def backward_decodes(model, ids, calls) -> tuple:
    """(loss, grads) of one top-level forward + backward, and how many decodes ran in the backward."""
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    calls.clear()
    loss.backward()
    return (loss.detach(), {n: p.grad.clone() for n, p in trainable(model).items()}), len(calls)


@pytest.mark.parametrize("basis", ["haar", "fft2"])
def test_recomputation_reuses_the_forwards_rows(basis, input_ids, monkeypatch):
    """With selora's checkpointing the recomputation decodes nothing: loss and every entry gradient equal (fp32,
    1e-6) those of the uncheckpointed model and of factor-by-factor decoding; HF's plain checkpointing decodes
    each factor once more in backward. No factor holds rows after the backward."""
    calls = count_decodes(monkeypatch)
    reference, _ = backward_decodes(checkpointed(seeded_model(basis), None), input_ids, calls)
    model = checkpointed(seeded_model(basis))
    replayed, replayed_decodes = backward_decodes(model, input_ids, calls)
    assert replayed_decodes == 0
    assert all(f.decoded is None for f in model.selora_decoder.factors)
    assert_same(reference, replayed)
    per_factor = checkpointed(seeded_model(basis))
    per_factor.selora_decoder.batched = False  # nothing handed out, nothing to replay: each factor decodes itself
    factor_by_factor, per_factor_decodes = backward_decodes(per_factor, input_ids, calls)
    assert_same(reference, factor_by_factor)
    plain = checkpointed(seeded_model(basis), "hf")
    hf_plain, plain_decodes = backward_decodes(plain, input_ids, calls)
    assert_same(reference, hf_plain)
    factors = len(model.selora_decoder.factors)
    assert per_factor_decodes == plain_decodes == factors  # 28 here, 448 at LLaMA-7B


def test_recomputation_is_exact_after_an_in_place_edit_of_the_entries(input_ids):
    """Forward, then every entry changed in place (no_grad), then backward: the recomputation replays the rows of
    the forward, so the gradients are those of the unedited model. (HF's plain checkpointing would recompute
    from the edited entries: different gradients, which shows the edit reaches the recomputation otherwise.)"""
    expected = loss_and_grads(checkpointed(seeded_model(), None), input_ids)

    def edited(how):
        model = checkpointed(seeded_model(), how)
        model.zero_grad(set_to_none=True)
        loss = model(input_ids, labels=input_ids).loss
        with torch.no_grad():
            for factor in model.selora_decoder.factors:
                factor.coefficients.mul_(1.5).add_(0.01)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trainable(model).items()}

    assert_same(expected, edited("selora"))
    _, stale = edited("hf")
    assert max(relative_error(stale[name], expected[1][name]) for name in stale) > 1e-2


def test_second_backward_through_the_same_graph_replays_again(input_ids):
    """retain_graph: torch enters each recomputation context once per backward; the second backward adds the same
    gradients again, and rows are taken back after each."""
    expected = loss_and_grads(checkpointed(seeded_model(), None), input_ids)
    model = checkpointed(seeded_model())
    model.zero_grad(set_to_none=True)
    loss = model(input_ids, labels=input_ids).loss
    loss.backward(retain_graph=True)
    assert all(f.decoded is None for f in model.selora_decoder.factors)
    loss.backward()
    assert_same((expected[0], {n: 2 * g for n, g in expected[1].items()}),
                (loss.detach(), {n: p.grad for n, p in trainable(model).items()}))
    assert all(f.decoded is None for f in model.selora_decoder.factors)


@pytest.mark.parametrize("basis", ["haar", "fft2"])
def test_srlora_tracks_the_same_row_gradients_when_recomputation_replays(basis, input_ids):
    """SRLoRA's per-pair gradients (AdapterLinear._track, hooks on the forward's rows) come out the same with
    selora's checkpointing as without checkpointing: the hooks sit on the forward's rows, not the replayed ones."""
    def tracked(how):
        model = checkpointed(seeded_model(basis), how)
        layers = selora.adapter_layers(model)
        for layer in layers.values():
            layer.track_pair_gradients = True
        loss_and_grads(model, input_ids)
        return {name: (layer.pair_grads.A, layer.pair_grads.Bt) for name, layer in layers.items()}

    expected, replayed = tracked(None), tracked("selora")
    for name, (grad_A, grad_Bt) in expected.items():
        assert grad_A is not None and grad_Bt is not None and grad_A.abs().sum() > 0, name
        assert relative_error(replayed[name][0], grad_A) < 1e-6, name
        assert relative_error(replayed[name][1], grad_Bt) < 1e-6, name


def test_a_merged_model_decodes_nothing_and_unmerge_restores_decoding(input_ids, monkeypatch):
    model = seeded_model().eval()
    calls = count_decodes(monkeypatch)
    with torch.no_grad():
        expected = model(input_ids).logits
        calls.clear()
        selora.merge(model)
        merged = model(input_ids).logits
        decodes_merged = len(calls)  # merge itself decoded each factor once; the forward decoded nothing
        calls.clear()
        model(input_ids)
        assert len(calls) == 0
        selora.unmerge(model)
        calls.clear()
        again = model(input_ids).logits
    assert decodes_merged == 2 * len(selora.adapter_layers(model)) and len(calls) > 0
    assert relative_error(merged, expected) < 1e-5 and relative_error(again, expected) < 1e-5


def test_detach_removes_the_decoders_hooks_and_the_factors_decode_themselves(input_ids, monkeypatch):
    """The decoder keeps its hook handles: after ``detach`` a forward runs neither hook (no batched transform),
    every factor decodes itself, and the outputs and gradients are the batched ones."""
    model = seeded_model("haar")
    decoder = model.selora_decoder
    batched = loss_and_grads(model, input_ids)
    decoder.detach(model)
    assert not hasattr(model, "selora_decoder") and decoder.hooks == []
    assert not model._forward_pre_hooks and not model._forward_hooks
    calls = count_decodes(monkeypatch)
    alone = loss_and_grads(model, input_ids)
    # The pre-hook would have decoded each shape group in one call; now A and B of every layer decode on their own.
    assert len(calls) == 2 * len(selora.adapter_layers(model)) and decoder.depth == 0
    assert_same(batched, alone)
