"""The UNet shared by the denoiser and the segmenter: shapes, condition nulls, independence, tracing, ONNX export."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from checkpoints import tiny_unet  # noqa: E402

from emserve.unet import UNet, UNetConfig, count_parameters, dropout_conditions  # noqa: E402

K, N, L = 4, 3, 4  # classes, datasets, label channels


def tiny(**overrides) -> UNet:
    """A tiny conditional UNet with random (non-zero) weights everywhere, including the zero-initialised head."""
    torch.manual_seed(0)
    model = tiny_unet(2, 3, **{"num_classes": K, "num_datasets": N, "label_channels": L, **overrides}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def inputs(model: UNet, batch: int, h: int = 8, w: int = 8, seed: int = 1) -> dict:
    torch.manual_seed(seed)
    return model.example_inputs(batch, h, w)


def nonnull(batch: int, h: int = 8, w: int = 8) -> dict:
    """Conditions that are certainly not null (no all-zero rows or maps)."""
    g = torch.Generator().manual_seed(5)
    sign = lambda *s: torch.randint(0, 2, s, generator=g).float() * 2 - 1  # noqa: E731
    return {"classes": sign(batch, K), "dataset": torch.randint(0, N, (batch,), generator=g),
            "label_map": sign(batch, L, h, w)}


@pytest.mark.parametrize(("multipliers", "batch", "h", "w"),
                         [((1, 2), 1, 8, 8), ((1, 2), 3, 4, 12), ((1, 2, 4), 2, 16, 8), ((1,), 2, 5, 7)])
def test_output_shape(multipliers, batch, h, w):
    model = tiny(multipliers=multipliers, attention_levels=tuple(range(len(multipliers))))
    with torch.no_grad():
        out = model(**inputs(model, batch, h, w))
    assert out.shape == (batch, 3, h, w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("multipliers", "h", "w"), [((1, 2), 7, 8), ((1, 2, 4), 16, 10), ((1, 2, 4), 2, 4)])
def test_bad_spatial_size_raises(multipliers, h, w):
    model = tiny(multipliers=multipliers)
    factor = 2 ** (len(multipliers) - 1)
    x = torch.randn(1, 2, h, w)
    with pytest.raises(ValueError, match=rf"{h}x{w}.*divisible by {factor}"):
        model(x, torch.zeros(1))


def test_zero_initialised_head_gives_zero_output():
    model = tiny_unet(2, 3)
    assert torch.count_nonzero(model(torch.randn(2, 2, 8, 8), torch.tensor([3.0, 500.0]))) == 0


@pytest.mark.parametrize("name", ["classes", "dataset", "label_map"])
def test_condition_changes_output(name):
    model = tiny()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        null = model(x, t)
        cond = model(x, t, **{name: nonnull(2)[name]})
    assert (null - cond).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every sample moved


def test_timestep_changes_output():
    model = tiny()
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.tensor([5.0])), model(x, torch.tensor([700.0])), atol=1e-5)


def test_none_equals_explicit_nulls():
    model = tiny()
    x, t = torch.randn(3, 2, 8, 8), torch.tensor([1.0, 50.0, 999.0])
    explicit = {"classes": torch.zeros(3, K), "dataset": torch.full((3,), -1), "label_map": torch.zeros(3, L, 8, 8)}
    with torch.no_grad():
        torch.testing.assert_close(model(x, t), model(x, t, **explicit), rtol=0, atol=0)
        for name, value in explicit.items():  # one condition at a time, too
            torch.testing.assert_close(model(x, t), model(x, t, **{name: value}), rtol=0, atol=0)


def test_null_is_per_sample_within_a_mixed_batch():
    model = tiny()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([100.0, 100.0])
    cond = nonnull(2)
    cond["classes"][1] = 0
    cond["dataset"][1] = -1
    cond["label_map"][1] = 0
    with torch.no_grad():
        mixed = model(x, t, **cond)
        null = model(x[1:], t[1:])
        full = model(x[:1], t[:1], **{k: v[:1] for k, v in cond.items()})
    torch.testing.assert_close(mixed[1:], null, rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[:1], full, rtol=0, atol=1e-5)


def test_per_sample_independence():
    model = tiny(multipliers=(1, 2, 4), attention_levels=(1, 2))
    batch = inputs(model, 3, 8, 8)
    batch["classes"][0] = 0  # one null row among real ones
    for train in (False, True):  # train mode too (dropout is 0): batch statistics would break it
        model.train(train)
        with torch.no_grad():
            together = model(**batch)
            for i in range(3):
                alone = model(**{k: v[i : i + 1] for k, v in batch.items()})
                torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_segmentation_config_runs_without_t():
    model = tiny(timestep=False, num_classes=0, num_datasets=0, label_channels=0)
    assert all(block.emb_proj is None for level in model.down for block in level.blocks)
    out = model(torch.randn(2, 2, 8, 8))
    assert out.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"t: .*timestep=False"):
        model(torch.randn(2, 2, 8, 8), torch.zeros(2))
    # A segmenter may still take a condition, e.g. the dataset it sees.
    steered = tiny(timestep=False, num_classes=0, label_channels=0)
    x = torch.randn(1, 2, 8, 8)
    with torch.no_grad():
        assert not torch.allclose(steered(x), steered(x, dataset=torch.tensor([1])), atol=1e-5)


def test_denoiser_needs_t():
    with pytest.raises(ValueError, match=r"t: .*needs t"):
        tiny()(torch.randn(1, 2, 8, 8))


def test_gradients_reach_null_embeddings_only_when_used():
    model = tiny()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([3.0, 30.0])
    model(x, t).square().mean().backward()
    assert model.null_classes.grad.abs().sum() > 0
    assert model.null_label_map.grad.abs().sum() > 0
    rows = model.dataset_emb.weight.grad.abs().sum(dim=1)
    assert rows[N] > 0 and torch.all(rows[:N] == 0)  # only the null row was used

    model.zero_grad(set_to_none=True)
    model(x, t, **nonnull(2)).square().mean().backward()
    assert model.null_classes.grad is None or model.null_classes.grad.abs().sum() == 0
    assert model.null_label_map.grad is None or model.null_label_map.grad.abs().sum() == 0
    assert model.dataset_emb.weight.grad[N].abs().sum() == 0


@pytest.mark.parametrize("name", ["classes", "dataset", "label_map"])
def test_disabled_condition_given_raises(name):
    model = tiny(num_classes=0, num_datasets=0, label_channels=0)
    value = nonnull(1)[name]
    if name == "classes":
        value = torch.ones(1, 2)
    elif name == "label_map":
        value = torch.ones(1, 2, 8, 8)
    with pytest.raises(ValueError, match=rf"{name}: this UNet has no {name} input"):
        model(torch.randn(1, 2, 8, 8), torch.zeros(1), **{name: value})


def test_bad_inputs_raise_naming_the_field():
    model = tiny()
    x, t = torch.randn(2, 2, 8, 8), torch.zeros(2)
    with pytest.raises(ValueError, match=r"dataset: ids must be in \[-1, 3\)"):
        model(x, t, dataset=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="dataset: expected integer"):
        model(x, t, dataset=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"classes: expected shape \[2, 4\]"):
        model(x, t, classes=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="label_map: expected shape"):
        model(x, t, label_map=torch.zeros(2, L, 4, 4))
    with pytest.raises(ValueError, match=r"x: expected \[B, 2, H, W\]"):
        model(torch.randn(2, 3, 8, 8), t)


def test_config_round_trip_and_validation():
    model = tiny(multipliers=(1, 2, 4), dropout=0.1)
    data = json.loads(json.dumps(model.config.to_dict()))
    assert data["attention_levels"] == [2]  # the default (lowest level) is stored explicitly
    config = UNetConfig.from_dict(data)
    assert config == model.config
    rebuilt = UNet.from_config(data)
    assert count_parameters(rebuilt) == count_parameters(model)
    assert rebuilt.load_state_dict(model.state_dict()) is not None
    with pytest.raises(ValueError, match="unknown keys"):
        UNetConfig.from_dict({**data, "depth": 3})
    with pytest.raises(ValueError, match=r"attention_levels: each must be in \[0, 2\) .*got \(2,\)"):
        UNetConfig(1, 1, multipliers=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match=r"dropout: must be in \[0, 1\), got 1.0"):
        UNetConfig(1, 1, dropout=1.0)


def test_count_parameters():
    model = tiny()
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == total
    model.stem.weight.requires_grad_(False)
    assert count_parameters(model) == total - model.stem.weight.numel()
    assert count_parameters(model, trainable_only=False) == total


# ---- dropout_conditions ---------------------------------------------------------------------------------------


def _conditions(batch: int) -> tuple:
    c = nonnull(batch)
    return c["classes"], c["dataset"], c["label_map"]


def test_dropout_conditions_p0_keeps_and_p1_nulls():
    classes, dataset, label_map = _conditions(16)
    kept = dropout_conditions(classes, dataset, label_map, 0.0, 0.0, 0.0, torch.Generator().manual_seed(0))
    for before, after in zip((classes, dataset, label_map), kept, strict=True):
        assert torch.equal(before, after)
    nulled = dropout_conditions(classes, dataset, label_map, 1.0, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert torch.all(nulled[0] == 0) and torch.all(nulled[1] == -1) and torch.all(nulled[2] == 0)
    assert torch.all(classes != 0) and torch.all(dataset >= 0)  # inputs untouched
    assert dropout_conditions(None, None, None, 0.5, 0.5, 0.5) == (None, None, None)
    assert dropout_conditions(None, dataset, None, 1.0, 1.0, 1.0)[0::2] == (None, None)
    with pytest.raises(ValueError, match=r"p_dataset: must be in \[0, 1\], got 1.5"):
        dropout_conditions(classes, dataset, label_map, 0.5, 1.5, 0.5)


def test_dropout_conditions_independent_per_sample_and_condition():
    batch = 4000
    classes, dataset, label_map = _conditions(batch)
    label_map = label_map[:, :, :2, :2].contiguous()
    c, d, m = dropout_conditions(classes, dataset, label_map, 0.5, 0.3, 0.7, torch.Generator().manual_seed(1))
    dropped_c = (c == 0).all(dim=1)
    assert torch.equal(dropped_c, (c == 0).any(dim=1))  # whole rows, never partial (p_class_entry=0)
    dropped_d = d == -1
    dropped_m = (m == 0).flatten(1).all(dim=1)
    assert torch.equal(dropped_m, (m == 0).flatten(1).any(dim=1))  # whole maps
    assert torch.equal(c[~dropped_c], classes[~dropped_c]) and torch.equal(d[~dropped_d], dataset[~dropped_d])
    rates = [v.float().mean().item() for v in (dropped_c, dropped_d, dropped_m)]
    for rate, p in zip(rates, (0.5, 0.3, 0.7), strict=True):
        assert abs(rate - p) < 0.04  # ~5 standard deviations
    for (a, pa), (b, pb) in [((dropped_c, 0.5), (dropped_d, 0.3)), ((dropped_c, 0.5), (dropped_m, 0.7)),
                             ((dropped_d, 0.3), (dropped_m, 0.7))]:
        assert abs((a & b).float().mean().item() - pa * pb) < 0.04
    again = dropout_conditions(classes, dataset, label_map, 0.5, 0.3, 0.7, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip((c, d, m), again, strict=True))


def test_dropout_conditions_per_class_entries():
    classes = torch.ones(4000, K)
    c, _, _ = dropout_conditions(classes, None, None, 0.0, 0.0, 0.0, torch.Generator().manual_seed(2),
                                 p_class_entry=0.25)
    assert abs((c == 0).float().mean().item() - 0.25) < 0.03
    assert set(c.unique().tolist()) == {0.0, 1.0}


# ---- tracing and export ---------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # GroupNorm's own batch-size check
def test_jit_trace_matches_eager():
    model = tiny()
    example = inputs(model, 2, 8, 8)
    names = list(example)
    with torch.no_grad():
        traced = torch.jit.trace(model, tuple(example.values()), check_trace=False)
        for batch, h, w in [(2, 8, 8), (3, 12, 4)]:
            other = inputs(model, batch, h, w, seed=batch)
            other["classes"][0] = 0  # a null row goes through the traced where()
            torch.testing.assert_close(traced(*[other[n] for n in names]), model(**other), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_attention_runs_on_the_fused_kernel_in_eager_torch_and_traced():
    """q/k/v must reach scaled_dot_product_attention with the last dim at stride 1, or it silently falls back to
    the unfused math kernel (~4x slower on CPU at 16x16), in training and in the exported TorchScript graph."""
    model = tiny()
    example = inputs(model, 2, 8, 8)
    with torch.no_grad():
        traced = torch.jit.trace(model, tuple(example.values()), check_trace=False)

    def traced_inference() -> None:
        with torch.no_grad():
            traced(*example.values())

    for run in (lambda: model(**example).sum().backward(), traced_inference):  # a training step; a served call
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            run()
        ops = {event.key for event in profile.key_averages()}
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in ops
        assert "aten::_scaled_dot_product_attention_math" not in ops


@pytest.mark.slow
def test_onnx_export_matches_eager(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = tiny(attention_levels=())  # attention in the middle only: export is slow (~20 s CPU), keep it small
    example = inputs(model, 2, 8, 12)
    path = tmp_path / "unet.onnx"
    torch.onnx.export(model, (), str(path), kwargs=example, dynamic_shapes=model.dynamic_shapes(example),
                      dynamo=True, external_data=False, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "t", "classes", "dataset", "label_map"]
    for batch, h, w in [(1, 16, 16), (5, 4, 20)]:
        feed = inputs(model, batch, h, w, seed=batch)
        feed["label_map"][-1] = 0  # a null map goes through the exported where()
        with torch.no_grad():
            expected = model(**feed).numpy()
        got = session.run(None, {k: v.numpy() for k, v in feed.items()})[0]
        assert got.shape == (batch, 3, h, w)
        assert abs(got - expected).max() < 1e-4
