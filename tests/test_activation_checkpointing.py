"""selora.enable_gradient_checkpointing: before or after apply, on SeLoRA and LoRA models alike; clear errors for
what it cannot do. (That the recomputation replays the forward's rows exactly: tests/test_decode.py.)"""
import pytest
import torch
from torch import nn

import selora
from selora.bases.basis import Basis

from conftest import build_tiny_llama, relative_error


def adapted(model, config):
    """``model`` with adapters of ``config`` and a non-zero B, so every factor receives a gradient."""
    selora.apply(model, config)
    with torch.no_grad():
        for layer in selora.adapter_layers(model).values():
            layer.lora_B.param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return model


def grads_and_backward_decodes(model, ids, monkeypatch):
    calls = []
    original = Basis.decode
    monkeypatch.setattr(Basis, "decode", lambda self, e, *a: calls.append(e.shape) or original(self, e, *a))
    loss = model.train()(ids, labels=ids).loss
    calls.clear()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, len(calls)


@pytest.mark.parametrize("config", [selora.SeLoRAConfig(r=4), selora.LoRAConfig(r=4)])
def test_before_or_after_apply_the_same_gradients_as_without(config, input_ids, monkeypatch):
    """The recipes enable checkpointing on the base model, before the adapters exist; a script may do it after.
    Either way the recomputation decodes nothing. A LoRA model has no decoder: its checkpointing is HF's plain one."""
    expected, _ = grads_and_backward_decodes(adapted(build_tiny_llama(), config), input_ids, monkeypatch)
    before = adapted(selora.enable_gradient_checkpointing(build_tiny_llama()), config)
    after = selora.enable_gradient_checkpointing(adapted(build_tiny_llama(), config))
    for model in (before, after):
        assert model.model.layers[0].gradient_checkpointing
        grads, decodes = grads_and_backward_decodes(model, input_ids, monkeypatch)
        assert decodes == 0
        assert grads.keys() == expected.keys()
        for name, grad in grads.items():
            assert grad.abs().sum() > 0, name
            assert relative_error(grad, expected[name]) < 1e-6, name


def test_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="use_reentrant"):
        selora.enable_gradient_checkpointing(build_tiny_llama(), use_reentrant=True)
    with pytest.raises(ValueError, match="context_fn"):
        selora.enable_gradient_checkpointing(build_tiny_llama(), context_fn=lambda: None)
    plain = selora.apply(nn.Sequential(nn.Linear(8, 8)), selora.SeLoRAConfig(r=2, target_modules=("0",)))
    with pytest.raises(TypeError, match="checkpoint_context_fn"):
        selora.enable_gradient_checkpointing(plain)


def test_context_fn_for_your_own_checkpoint_calls():
    """A plain PyTorch model: checkpoint(..., context_fn=selora.checkpoint_context_fn(model)) inside its forward
    decodes nothing in backward and gives the uncheckpointed gradients."""
    class Block(nn.Module):
        def __init__(self, checkpointed: bool):
            super().__init__()
            self.body, self.checkpointed = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)), checkpointed
            self.context_fn = None

        def forward(self, x):
            if not self.checkpointed:
                return self.body(x)
            return torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=False, context_fn=self.context_fn)

    def build(checkpointed):
        torch.manual_seed(0)
        model = nn.Sequential(Block(checkpointed), Block(checkpointed))
        selora.apply(model, selora.SeLoRAConfig(r=4, target_modules=("re:.*body\\.[02]",)))
        with torch.no_grad():
            for layer in selora.adapter_layers(model).values():
                layer.lora_B.param.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        for block in model:
            block.context_fn = selora.checkpoint_context_fn(model)
        return model

    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))
    expected = build(False)
    expected(x).pow(2).sum().backward()
    model = build(True)
    loss = model(x).pow(2).sum()
    decodes = []
    for factor in model.selora_decoder.factors:
        factor.register_forward_hook(lambda module, args, out: decodes.append(module.decoded is None))
    loss.backward()
    assert decodes and not any(decodes)  # every factor called in the recomputation found replayed rows
    for (name, p), q in zip(model.named_parameters(), expected.parameters()):
        if p.requires_grad:
            assert relative_error(p.grad, q.grad) < 1e-6, name
