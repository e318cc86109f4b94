"""SRLoRA: recomposition keeps the function, never reuses a direction, follows the gradient, resets the right
optimizer rows, resumes to the same decision, and rejects bad schedules up front."""
import copy

import pytest
import torch
from torch import nn

import selora
from selora.config import ConfigValueError, SRLoRAConfig
from selora.srlora import SRLoRA
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import quantize_projections

bnb = pytest.importorskip("bitsandbytes")

TINY = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=128)
# Measured on this model: re-quantizing an nf4 base after a fusion moves the logits by 0.08-0.10 (relative L2);
# the bound leaves headroom for other seeds. The "residual" mode keeps the base untouched and is exact.
NF4_REQUANTIZE_JUMP_BOUND = 0.2


def tiny_llama(quantized: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY)
    return quantize_projections(model, "4bit") if quantized else model


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def train_steps(model, rec, optimizer, ids, steps, start=1, on_event=None):
    """Plain loop: forward/backward/step, then rec.step; returns the events and the logits around each."""
    events = []
    for step in range(start, start + steps):
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            before = model(ids).logits
        new = rec.step(step, optimizer)
        if new:
            with torch.no_grad():
                after = model(ids).logits
            if on_event:
                on_event(step, before, after, new)
        events += new
    return events


def setup(config, quantized=False, srlora=None, steps=6, lr=1e-2):
    model = tiny_llama(quantized)
    selora.apply(model, config)
    rec = SRLoRA(model, srlora or SRLoRAConfig(start_step=2, end_step=steps, interval=2), total_steps=steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    ids = torch.randint(0, TINY.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    return model, rec, optimizer, ids


ADAPTERS = {
    "lora": selora.LoRAConfig(r=4),
    "selora_haar": selora.SeLoRAConfig(r=4),
    "selora_fft2_dora_pissa": selora.SeLoRAConfig(r=4, basis="fft2", spectral_ratio=0.3, use_dora=True, init="pissa"),
}


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_output_and_effective_weight_unchanged_by_recomposition(name):
    model, rec, optimizer, ids = setup(copy.deepcopy(ADAPTERS[name]))
    jumps = []
    layer = selora.adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    weights = {}

    orig_step = rec.step

    def step_with_weights(step, opt):
        weights["before"] = layer.effective_weight()
        out = orig_step(step, opt)
        weights["after"] = layer.effective_weight()
        if out:
            assert (weights["after"] - weights["before"]).abs().max().item() < 1e-5
        return out

    rec.step = step_with_weights
    events = train_steps(model, rec, optimizer, ids, 6, on_event=lambda s, b, a, e: jumps.append(relative(a, b)))
    assert len(jumps) == 3 and events, "the schedule 2, 4, 6 must fire three times"
    assert max(jumps) < 1e-5, jumps


# Rows a recomposition of one pair records (old and new products): a row-wise factor changes only the replaced row;
# a 2-D Haar factor re-fitted as a whole also changes the row it is paired with along the rank axis.
RECORDED_ROWS_PER_PAIR = {"dct_rows": 2, "haar": 4}


@pytest.mark.parametrize("basis", list(RECORDED_ROWS_PER_PAIR))
def test_quantized_bases_residual_is_exact_requantize_is_bounded(basis):
    rows = RECORDED_ROWS_PER_PAIR[basis]
    for mode, bound in (("residual", 1e-5), ("requantize", NF4_REQUANTIZE_JUMP_BOUND)):
        model, rec, optimizer, ids = setup(selora.SeLoRAConfig(r=4, basis=basis), quantized=True,
                                           srlora=SRLoRAConfig(start_step=2, end_step=6, interval=2, quantized_fusion=mode))
        jumps = []
        train_steps(model, rec, optimizer, ids, 6, on_event=lambda s, b, a, e: jumps.append(relative(a, b)))
        assert len(jumps) == 3
        assert max(jumps) < bound, (mode, jumps)
        layer = selora.adapter_layers(model)["model.layers.0.mlp.up_proj"]
        if mode == "residual":
            assert layer.residual_A.shape[0] == rows * 3 and layer.base_delta_A.shape[0] == 0
        else:
            assert layer.base_delta_A.shape[0] == rows * 3 and layer.residual_A.shape[0] == 0


def test_directions_are_never_reused_and_reinit_follows_them():
    model, rec, optimizer, ids = setup(selora.LoRAConfig(r=4),
                                       srlora=SRLoRAConfig(start_step=1, end_step=9, interval=1, pairs_per_recomposition=2),
                                       steps=9)
    events = train_steps(model, rec, optimizer, ids, 9)
    for index, name in enumerate(rec.layers):
        used = rec.used[index]
        assert len(used) == len(set(used)) == 9 * 2
        assert [d for e in events if e["layer"] == name for d in e["directions"]] == used
    # The last re-initialised pairs of a LoRA layer lie exactly along the directions they were given.
    last = [e for e in events if e["layer"] == "model.layers.1.mlp.down_proj"][-1]
    layer, d = rec.layers[last["layer"]], rec.directions[last["layer"]]
    A, B = layer.factor_matrices()
    for pair, column in zip(last["pairs"], last["directions"]):
        cosine = torch.nn.functional.cosine_similarity(A[pair], d.V[:, column], dim=0).abs()
        assert cosine > 1 - 1e-4  # one optimizer step has not happened since the re-init


def test_importance_follows_the_gradient_signal_pair_is_fused_last():
    """Only pair 0 reaches the loss (the others have B = 0 and zero A-gradient); it is never chosen."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16, bias=False))
    selora.apply(base, selora.LoRAConfig(r=4, target_modules=("0",)))
    layer = selora.adapter_layers(base)["0"]
    with torch.no_grad():
        layer.lora_B.weight.zero_()
        layer.lora_B.weight[0].normal_()
    rec = SRLoRA(base, SRLoRAConfig(start_step=3, end_step=9, interval=3, pairs_per_recomposition=1), total_steps=9)
    optimizer = torch.optim.SGD([p for p in base.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    target = x @ torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    fused = []
    for step in range(1, 10):
        # freeze the silent pairs' B so only pair 0 keeps the signal
        loss = ((base(x) - target) ** 2).mean()
        loss.backward()
        layer.lora_B.weight.grad[1:] = 0
        optimizer.step()
        optimizer.zero_grad()
        fused += [p for e in rec.step(step, optimizer) for p in e["pairs"]]
        assert torch.isfinite(rec.scores()).all()
    assert len(fused) == 3
    assert 0 not in fused, f"pair 0 carries the signal but was fused: {fused}"
    assert rec.scores()[0, 0] == rec.scores()[0].max()


def test_optimizer_state_reset_only_for_replaced_rows():
    model, rec, optimizer, ids = setup(selora.SeLoRAConfig(r=4),
                                       srlora=SRLoRAConfig(start_step=3, end_step=3, interval=1), steps=3)
    train_steps(model, rec, optimizer, ids, 2)  # moments are non-zero now
    model.train()
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    layer = rec.layers["model.layers.0.self_attn.v_proj"]
    before = {k: v.clone() for k, v in optimizer.state[layer.lora_A.param].items() if torch.is_tensor(v) and v.dim() == 2}
    events = rec.step(3, optimizer)
    pairs = [e for e in events if e["layer"] == "model.layers.0.self_attn.v_proj"][0]["pairs"]
    others = [i for i in range(4) if i not in pairs]
    for key, old in before.items():
        new = optimizer.state[layer.lora_A.param][key]
        assert old[pairs].abs().sum() > 0
        assert torch.count_nonzero(new[pairs]) == 0
        assert torch.equal(new[others], old[others])


def test_state_round_trip_resume_makes_the_same_next_decision(tmp_path):
    cfg = SRLoRAConfig(start_step=2, end_step=8, interval=2)
    model, rec, optimizer, ids = setup(selora.SeLoRAConfig(r=4), srlora=cfg, steps=8)
    straight = train_steps(model, rec, optimizer, ids, 8)

    model, rec, optimizer, ids = setup(selora.SeLoRAConfig(r=4), srlora=cfg, steps=8)
    first = train_steps(model, rec, optimizer, ids, 5)
    selora.save_adapter(model, tmp_path / "ckpt", extra_state=rec.state_dict())
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")

    resumed = tiny_llama()
    selora.apply(resumed, selora.SeLoRAConfig(r=4))
    rec2 = SRLoRA(resumed, cfg, total_steps=8)
    rec2.load_state_dict(selora.load_adapter(resumed, tmp_path / "ckpt"))
    optimizer2 = torch.optim.AdamW([p for p in resumed.parameters() if p.requires_grad], lr=1e-2)
    optimizer2.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    assert rec2.used == rec.used and torch.equal(rec2.scores(), rec.scores())
    second = train_steps(resumed, rec2, optimizer2, ids, 3, start=6)
    assert first + second == straight


def test_bad_schedules_and_sizes_fail_at_config_time():
    with pytest.raises(ConfigValueError, match="never fires"):
        SRLoRAConfig(start_step=10, end_step=5)
    with pytest.raises(ConfigValueError, match="warm-up"):
        SRLoRAConfig(start_step=5, end_step=50, warmup_steps=10)
    model = tiny_llama()
    selora.apply(model, selora.LoRAConfig(r=4))
    with pytest.raises(ConfigValueError, match="never fires within 10 training steps"):
        SRLoRA(model, SRLoRAConfig(start_step=20, end_step=40), total_steps=10)
    with pytest.raises(ConfigValueError, match="must be smaller than the rank r=4"):
        SRLoRA(model, SRLoRAConfig(pairs_per_recomposition=4), total_steps=100)
    with pytest.raises(ConfigValueError, match="principal directions"):
        SRLoRA(model, SRLoRAConfig(start_step=1, end_step=100, interval=1, pairs_per_recomposition=3), total_steps=100)
    assert all(not layer.track_pair_gradients for layer in selora.adapter_layers(model).values())


def test_partitioned_quantized_base_cannot_be_requantized():
    model = tiny_llama(quantized=True)
    selora.apply(model, selora.LoRAConfig(r=4))
    layer = selora.adapter_layers(model)["model.layers.0.self_attn.q_proj"]
    layer.base_layer.weight.ds_id = 0  # what a ZeRO-3 partitioned parameter carries
    with pytest.raises(ConfigValueError, match="quantized_fusion=residual"):
        SRLoRA(model, SRLoRAConfig(quantized_fusion="requantize"), total_steps=100)


@pytest.mark.parametrize("config", [selora.LoRAConfig(r=3), selora.SeLoRAConfig(r=3, spectral_ratio=0.5)])
def test_sensitivity_matches_the_formula_over_accumulated_micro_batches(config):
    """I_i = mean over pair i's elements of |theta * dL/dtheta| (decoded factors), gradients summed over
    micro-batches; with ema_beta = 0 the importance after one step is exactly that."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    selora.apply(model, config.__class__(**{**config.__dict__, "target_modules": ("0",)}))
    layer = selora.adapter_layers(model)["0"]
    with torch.no_grad():
        layer.lora_B.param.normal_()
    rec = SRLoRA(model, SRLoRAConfig(start_step=50, end_step=50, ema_beta=0.0, uncertainty_beta=0.0), total_steps=50)
    batches = [torch.randn(4, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    grads_A, grads_Bt = torch.zeros(3, 12), torch.zeros(3, 10)
    for x in batches:  # three micro-batches, three forwards: the hooks must add each gradient exactly once
        A_rows, Bt_rows = layer.lora_A(), layer.lora_B()
        out = model(x).pow(2).sum()
        out.backward()
        gA, gBt = torch.autograd.grad(
            (nn.functional.linear(nn.functional.linear(x, A_rows), Bt_rows.T) * layer.scaling
             + layer.base_layer(x)).pow(2).sum(), (A_rows, Bt_rows))
        grads_A += gA
        grads_Bt += gBt
    A, B = layer.factor_matrices()
    expected = ((A * grads_A).abs().sum(1) + (B.T * grads_Bt).abs().sum(1)) / (12 + 10)
    rec.update_scores()
    assert torch.allclose(rec.importance[0], expected, rtol=1e-5, atol=1e-7)


def test_an_overflowed_gradient_leaves_the_scores_as_they_were():
    """float16 loss scaling: a step whose gradients overflowed is skipped by the scaler; its inf/nan must not
    enter the running averages (they would stay there for good), while the next good step updates as usual."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    selora.apply(model, selora.LoRAConfig(r=3, target_modules=("0",)))
    with torch.no_grad():
        selora.adapter_layers(model)["0"].lora_B.param.normal_()
    rec = SRLoRA(model, SRLoRAConfig(start_step=50, end_step=50), total_steps=50)

    def step(scale: float) -> None:
        model(torch.randn(4, 12, generator=torch.Generator().manual_seed(0)) * scale).pow(2).sum().backward()
        model.zero_grad()
        rec.update_scores()

    step(1.0)
    before = (rec.importance.clone(), rec.uncertainty.clone())
    assert before[0].gt(0).all() and before[1].gt(0).all()
    step(1e30)  # the squared outputs overflow float32: gradients are inf
    assert torch.equal(rec.importance, before[0]) and torch.equal(rec.uncertainty, before[1])
    step(1.0)
    assert torch.isfinite(rec.scores()).all() and not torch.equal(rec.importance, before[0])


@pytest.mark.parametrize("basis", ["haar", "db4", "fft2", "bior2.2"])
def test_whole_factor_refit_on_2d_bases(basis):
    """A recomposition on a 2-D factor re-fits the factor as a whole: the entries are the least-squares fit of
    (old factor with the replaced rows set to the new directions); the base absorbs exactly old - new product
    (function unchanged < 1e-5, fp32); optimizer moments are zeroed exactly on the entries that moved, and for an
    orthonormal local wavelet (haar) the entries whose basis functions miss the replaced rows neither move nor
    lose their moments."""
    model, rec, optimizer, ids = setup(selora.SeLoRAConfig(r=8, basis=basis))
    train_steps(model, rec, optimizer, ids, 1)  # one step: Adam moments exist
    name = "model.layers.0.mlp.up_proj"
    layer = rec.layers[name]
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        before_out = layer(x)
    old_A = layer.lora_A.coefficients.detach().clone()
    old_moments = optimizer.state[layer.lora_A.coefficients]["exp_avg"].clone()
    old_factor = layer.lora_A().detach().clone()
    pairs = torch.tensor([2])
    d = rec.directions[name]
    directions = type(d)(d.U[:, 1:2], d.S[1:2], d.V[:, 1:2])
    width_before = layer.base_delta_A.shape[0]
    layer.replace_pairs(pairs, directions, optimizer=optimizer)
    with torch.no_grad():
        after_out = layer(x)
    assert relative(after_out, before_out) < 1e-5

    target = old_factor.clone()
    target[2] = (d.S[1] / layer.scaling).sqrt() * d.V[:, 1]
    factor = layer.lora_A
    refit = factor.basis.fit(target.double(), factor.index_set.indices)
    # the least-squares fit of the whole target (fft2's solution is unique only up to conjugate pairs: compare factors)
    refit_factor = factor.basis.decode(refit, factor.index_set.indices, factor.rows, factor.length)
    assert relative(factor().detach(), refit_factor) < 1e-5
    if basis != "fft2":
        assert relative(factor.coefficients.detach(), refit) < 1e-5
    moved = factor.coefficients.detach() != old_A
    moments = optimizer.state[factor.coefficients]["exp_avg"]
    assert torch.all(moments[moved] == 0) and torch.equal(moments[~moved], old_moments[~moved])
    changed_rows = (layer.lora_A().detach() != old_factor).any(1)
    assert layer.base_delta_A.shape[0] - width_before <= 2 * layer.r
    if basis == "haar":  # local: only rows 2 and 3 (one Haar pair along the rank axis) can change
        assert changed_rows.nonzero().squeeze(1).tolist() == [2, 3]
        assert 0 < moved.sum() < moved.numel() // 2


def test_randomized_svd_uses_the_configured_oversampling(monkeypatch):
    """srlora.svd_oversample reaches torch.svd_lowrank: q = directions needed + oversample."""
    import selora.svd as svd_module
    seen = []
    lowrank = torch.svd_lowrank

    def recording(matrix, q, niter):
        seen.append(q)
        return lowrank(matrix, q=q, niter=niter)

    monkeypatch.setattr(svd_module.torch, "svd_lowrank", recording)
    columns = {}
    for oversample in (2, 5):
        seen.clear()
        model = selora.apply(LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=1,
                                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)),
                             selora.LoRAConfig(r=4, target_modules=("q_proj",)))
        SRLoRA(model, SRLoRAConfig(start_step=1, end_step=2, interval=1, svd="randomized", svd_oversample=oversample),
               total_steps=2)
        assert len(seen) == 1  # one adapted projection, one SVD
        columns[oversample] = seen[0]
    assert columns[5] - columns[2] == 3  # q grew by exactly the oversampling difference


@pytest.mark.parametrize("r, total, pairs, steps", [
    (16, 200, 8, [50, 100, 150]),   # the SmolLM2 study: N = (48 - 16) / 8 = 4 switches, the 4th would be at the end
    (8, 60, 4, [15, 30, 45]),       # llama_srlora's own defaults (r 8, 60 steps)
    (8, 61, 4, [15, 30, 45, 60]),   # a switch one step before the end still has a step to train
])
def test_paper_schedule_from_a_target_rank(r, total, pairs, steps):
    config = SRLoRAConfig(schedule="paper").for_run(r, total)
    assert config.schedule == "fixed" and config.pairs_per_recomposition == pairs
    assert config.recomposition_steps() == steps
    explicit = SRLoRAConfig(schedule="paper", target_rank=2 * r, pairs_fraction=0.25).for_run(r, total)
    assert explicit.pairs_per_recomposition == max(1, round(r / 4))  # (2r - r) / (r / 4) = 4 switches again
    assert SRLoRAConfig(start_step=3, interval=3, end_step=9).for_run(r, total).recomposition_steps() == [3, 6, 9]


def test_paper_schedule_errors_name_the_key():
    with pytest.raises(ConfigValueError, match=r"srlora.start_step=3 not used: srlora.schedule=paper derives"):
        SRLoRAConfig(schedule="paper", start_step=3)
    with pytest.raises(ConfigValueError, match=r"srlora.target_rank=10 leaves no switch.*8 \+ 4"):
        SRLoRAConfig(schedule="paper", target_rank=10).for_run(8, 100)
    with pytest.raises(ConfigValueError, match=r"4 switch\(es\) do not fit in 3 training steps"):
        SRLoRAConfig(schedule="paper").for_run(8, 3)
    with pytest.raises(ConfigValueError, match=r"srlora.schedule='cyclic': choose 'fixed' or 'paper'"):
        SRLoRAConfig(schedule="cyclic")
    with pytest.raises(ConfigValueError, match=r"srlora.pairs_fraction=1.0: must be in \(0, 1\)"):
        SRLoRAConfig(pairs_fraction=1.0)


def test_pair_gradient_tracking_of_dense_factors_switches_on_and_off():
    """Dense factors are tracked by one hook on each parameter: on, every backward's gradient is summed into
    pair_grads (equal to the parameter's own gradient); off, the hooks are gone and nothing is recorded. The held
    gradient is never the parameter's .grad storage (the hook keeps autograd's tensor without copying it; autograd
    must then copy rather than hand it on), so summing into .grad in place cannot change what SRLoRA holds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6))
    selora.apply(model, selora.LoRAConfig(r=2, target_modules=("0",)))
    layer = selora.adapter_layers(model)["0"]
    with torch.no_grad():
        layer.lora_B.param.normal_()
    x = torch.randn(5, 8)
    layer.track_pair_gradients = True
    layer.track_pair_gradients = True  # switching on twice keeps one hook per factor
    model(x).pow(2).sum().backward()
    held_A, held_Bt = layer.pair_grads.A, layer.pair_grads.Bt
    first_A, first_Bt = held_A.clone(), held_Bt.clone()
    assert held_A.data_ptr() != layer.lora_A.param.grad.data_ptr()
    assert held_Bt.data_ptr() != layer.lora_B.param.grad.data_ptr()
    model(x * 0.5).pow(2).sum().backward()  # a second micro-batch: .grad summed in place
    assert torch.equal(held_A, first_A) and torch.equal(held_Bt, first_Bt)
    assert torch.allclose(layer.pair_grads.A, layer.lora_A.param.grad)
    assert torch.allclose(layer.pair_grads.Bt, layer.lora_B.param.grad)
    assert layer.pair_grads.A.dtype == torch.float32
    layer.track_pair_gradients = False
    layer.pair_grads.clear()
    model(x).pow(2).sum().backward()
    assert layer.pair_grads.A is None and layer.pair_grads.Bt is None


@pytest.mark.parametrize("config", [selora.LoRAConfig(r=3), selora.SeLoRAConfig(r=3, spectral_ratio=0.5)])
def test_scores_decode_same_shape_layers_together_or_one_by_one_alike(config):
    """SRLoRA scores stacked same-shape layers: their factors, decoded in one batched call, are each layer's own
    decoded factors; with a factor whose index set is its own (adapters from selora < 0.2) it decodes layer by
    layer, with the same result."""
    from selora.decode import IndexSet
    from selora.srlora import ScoreGroup
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Linear(12, 10))
    selora.apply(model, config.__class__(**{**config.__dict__, "target_modules": ("0", "1")}))
    layers = list(selora.adapter_layers(model).values())
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.param.normal_()
    rec = SRLoRA(model, SRLoRAConfig(start_step=50, end_step=50), total_steps=50)
    group = rec.score_groups()[0]
    assert group.members == layers and group.rows.tolist() == [0, 1]

    def expected():
        rows = torch.stack([layer.pair_rows() for layer in layers])
        return rows[..., :12], rows[..., 12:]
    assert group.together
    for got, want in zip(group.stacked_factors("cpu"), expected()):
        assert torch.allclose(got, want, atol=1e-6)
    if isinstance(config, selora.SeLoRAConfig):
        factor = layers[1].lora_A
        factor.index_set = IndexSet.draw(factor.basis_name, factor.rows, factor.length, factor.index_set.count, seed=7)
        group = ScoreGroup((12, 10), layers, torch.tensor([0, 1]), 3)
        assert not group.together
        for got, want in zip(group.stacked_factors("cpu"), expected()):
            assert torch.allclose(got, want, atol=1e-6)


def test_schedule_checked_by_one_function_for_the_recipe_and_the_library():
    """recipes/validate.py's early check and selora.SRLoRA raise the same message (only r's name differs)."""
    from recipes.validate import check_srlora_schedule

    model = tiny_llama()
    selora.apply(model, selora.LoRAConfig(r=4))
    for config, total_steps in ((SRLoRAConfig(start_step=20, end_step=40), 10),
                                (SRLoRAConfig(pairs_per_recomposition=4), 100)):
        with pytest.raises(ConfigValueError) as early:
            check_srlora_schedule(config, selora.LoRAConfig(r=4), total_steps)
        with pytest.raises(ConfigValueError) as late:
            SRLoRA(model, config, total_steps=total_steps)
        assert str(early.value) == str(late.value).replace("rank r=", "rank adapter.r=")
