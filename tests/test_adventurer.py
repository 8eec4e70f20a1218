"""The Adventurer student: sizes, any-resolution forward/backward, flips, masking and the timm interface."""
import pytest
import safetensors.torch
import timm
import torch

import vitlinearizer  # noqa: F401  (registers the models)
from vitlinearizer.models.adventurer_block import AdventurerBlock


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,paper_millions", [
    ("adventurer_small_patch16_224", 44), ("adventurer_base_patch16_224", 99), ("adventurer_large_patch16_224", 346),
])
def test_parameter_counts_match_the_paper(name, paper_millions):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert abs(n_params(model) / 1e6 - paper_millions) / paper_millions <= 0.03


def test_tiny_parameter_count():
    # The paper rounds Tiny to "~12M"; the official code's architecture gives 11.6M (shared/reference notes).
    with torch.device("meta"):
        model = timm.create_model("adventurer_tiny_patch16_224")
    assert abs(n_params(model) / 1e6 - 11.6) / 11.6 <= 0.01
    assert 11.5e6 <= n_params(model) < 12.5e6  # rounds to 12M


def test_list_and_create_with_timm():
    names = timm.list_models("adventurer*")
    assert {"adventurer_tiny_patch16_224", "adventurer_small_patch16_224", "adventurer_base_patch16_224",
            "adventurer_large_patch16_224", "adventurer_nano_patch4_28"} <= set(names)
    model = timm.create_model("adventurer_nano_patch4_28", num_classes=7)
    assert model(torch.randn(2, 3, 28, 28)).shape == (2, 7)
    assert model.pretrained_cfg["input_size"] == (3, 28, 28)


def small_tiny(**kwargs):
    """Tiny's structure at depth 4, to keep 224-px backward passes quick on CPU."""
    torch.manual_seed(0)
    return timm.create_model("adventurer_tiny_patch16_224", depth=4, num_classes=5, **kwargs)


@pytest.mark.parametrize("name,size,kwargs", [
    ("adventurer_tiny_patch16_224", (224, 224), dict(depth=4)),
    ("adventurer_tiny_patch16_224", (160, 208), dict(depth=4)),
    ("adventurer_nano_patch4_28", (28, 28), {}),
    ("adventurer_nano_patch4_28", (36, 64), dict(mixer="gla")),
    ("adventurer_nano_patch4_28", (28, 28), dict(mixer="hgrn")),
], ids=["224", "160x208", "demo", "demo-gla-36x64", "demo-hgrn"])
def test_forward_backward_every_parameter_gets_gradient(name, size, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, use_mask_token=True, **kwargs)
    x = torch.randn(2, 3, *size)
    grid = model.patch_grid(*size)
    mask = torch.rand(2, grid[0] * grid[1]) < 0.5
    out = model.forward_head(model.forward_features(x, mask=mask))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_flips_alternate_and_flip_reverses_scan():
    model = small_tiny()
    assert [b.flip for b in model.blocks] == [i % 2 == 1 for i in range(4)]
    torch.manual_seed(0)
    block = AdventurerBlock(32, mixer_kwargs=dict(d_state=8, head_dim=16), flip=True).double()
    plain = AdventurerBlock(32, mixer_kwargs=dict(d_state=8, head_dim=16), flip=False).double()
    plain.load_state_dict(block.state_dict())
    x = torch.randn(2, 10, 32, dtype=torch.float64)  # 9 patches + class token last

    def flip(t):
        return torch.cat([t[:, :-1].flip(1), t[:, -1:]], 1)

    torch.testing.assert_close(block(x), flip(plain(flip(x))))
    assert not torch.allclose(block(x), plain(x))


def test_class_token_is_last_and_sees_every_patch():
    model = small_tiny().eval()
    x = torch.randn(1, 3, 64, 64)
    tokens = model.forward_features(x)
    assert tokens.shape == (1, 17, 256)
    x2 = x.clone()
    x2[..., :16, :16] += 1.0  # change the first patch only
    assert not torch.allclose(model.forward_features(x2)[:, -1], tokens[:, -1])


def test_masked_forward_only_depends_on_visible_patches():
    model = small_tiny(use_mask_token=True).eval()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, [0, 5, 6, 15]] = True
    base = model.forward_features(x, mask=mask)
    hidden = x.clone()
    hidden[..., 16:32, 16:32] = torch.randn(2, 3, 16, 16)  # patch 5 is masked: nothing changes
    torch.testing.assert_close(model.forward_features(hidden, mask=mask), base)
    seen = x.clone()
    seen[..., 16:32, 32:48] = torch.randn(2, 3, 16, 16)  # patch 6 is masked too
    seen[..., 0:16, 16:32] = torch.randn(2, 3, 16, 16)  # patch 1 is visible: output changes
    assert not torch.allclose(model.forward_features(seen, mask=mask), base)
    assert not torch.allclose(model.forward_features(x), base)  # masking changes the input


def test_forward_intermediates_shapes_and_consistency():
    model = small_tiny().eval()
    x = torch.randn(2, 3, 96, 128)
    final, inter = model.forward_intermediates(x, indices=[0, 3])
    assert [t.shape for t in inter] == [(2, 256, 6, 8)] * 2
    torch.testing.assert_close(final, model.forward_features(x))
    nlc = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True,
                                      return_prefix_tokens=True)
    assert len(nlc) == 2 and nlc[0][0].shape == (2, 48, 256) and nlc[0][1].shape == (2, 1, 256)
    torch.testing.assert_close(nlc[1][0].transpose(1, 2).reshape(2, 256, 6, 8), inter[1])


def test_grad_checkpointing_gives_same_output_and_grads():
    model = small_tiny()
    x = torch.randn(1, 3, 64, 64)
    ref = model(x)
    g_ref = torch.autograd.grad(ref.sum(), list(model.parameters()))
    model.set_grad_checkpointing(True)
    out = model(x)
    torch.testing.assert_close(out, ref)
    for a, b in zip(torch.autograd.grad(out.sum(), list(model.parameters())), g_ref):
        torch.testing.assert_close(a, b)


def test_set_input_size_resamples_position_embedding():
    model = small_tiny().eval()
    x = torch.randn(1, 3, 160, 96)
    dynamic = model(x)
    model.set_input_size((160, 96))
    assert model.pos_embed.shape == (1, 10 * 6 + 1, 256)
    torch.testing.assert_close(model(x), dynamic)


def test_safetensors_round_trip_through_timm(tmp_path):
    model = timm.create_model("adventurer_nano_patch4_28", num_classes=10).eval()
    path = tmp_path / "student.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(path))
    loaded = timm.create_model("adventurer_nano_patch4_28", pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(3, 3, 28, 28)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_training_tasks_state_dict_loads_its_student_only(tmp_path):
    # A Trainer checkpoint's model.safetensors holds the task: the student under "student." beside the
    # distillation predictor, which the classifier must not be offered.
    task = torch.nn.Module()
    task.student = timm.create_model("adventurer_nano_patch4_28", use_mask_token=True).eval()
    task.predictor = torch.nn.Linear(task.student.embed_dim, 48)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(task.state_dict(), str(path))
    loaded = timm.create_model("adventurer_nano_patch4_28", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(loaded(x), task.student(x), rtol=0, atol=0)


def test_distilled_checkpoint_with_mask_token_loads_as_classifier(tmp_path):
    student = timm.create_model("adventurer_nano_patch4_28", use_mask_token=True).eval()
    path = tmp_path / "distilled.safetensors"
    safetensors.torch.save_file(student.state_dict(), str(path))
    plain = timm.create_model("adventurer_nano_patch4_28", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(plain(x), student(x))


@pytest.mark.parametrize("mixer", ["mamba2", "gla"])
def test_torch_export_captures_the_whole_model(mixer):
    # The chunked kernel's data-dependent choices (span guard, overflow check) must not reach a captured graph.
    torch.manual_seed(0)
    model = timm.create_model("adventurer_nano_patch4_28", num_classes=3, mixer=mixer).eval()
    program = torch.export.export(model, (torch.randn(2, 3, 28, 28),))
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_torch_export_with_dynamic_height_and_width_serves_every_size():
    # One program for all sizes, the native one included: no branch on the input's size may be fixed into it.
    torch.manual_seed(0)
    model = timm.create_model("adventurer_nano_patch4_28", num_classes=3, depth=2).eval()
    h, w = torch.export.Dim("h", min=2, max=16), torch.export.Dim("w", min=2, max=16)
    program = torch.export.export(model, (torch.randn(2, 3, 20, 36),), dynamic_shapes=({2: 4 * h, 3: 4 * w},))
    for size in [(28, 28), (20, 36), (8, 64)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mixer", ["mamba2", "gla", "hgrn"])
def test_fx_traced_model_runs_at_any_resolution_and_keeps_its_input_checks(mixer):
    # torch.fx records the size-dependent steps (input check, patch grid, position-embedding resample, scan order,
    # the recurrence) as calls, so one traced graph serves every resolution, as the model does.
    torch.manual_seed(0)
    model = timm.create_model("adventurer_nano_patch4_28", num_classes=3, mixer=mixer).eval()
    graph = torch.fx.symbolic_trace(model)
    assert any(node.target.__name__ == "linear_recurrence" for node in graph.graph.nodes if node.op == "call_function")
    for size in [(28, 28), (20, 36)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(graph(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        graph(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match="add a batch dimension"):
        graph(torch.randn(3, 28, 28))


def test_timm_fx_feature_extraction():
    from timm.models._features_fx import create_feature_extractor

    torch.manual_seed(0)
    model = timm.create_model("adventurer_nano_patch4_28").eval()
    x = torch.randn(2, 3, 28, 36)
    extractor = create_feature_extractor(model, return_nodes={"blocks.1": "block1", "norm": "final"})
    with torch.no_grad():
        features = extractor(x)
        final, (block1,) = model.forward_intermediates(x, indices=[1], output_fmt="NLC")
    torch.testing.assert_close(features["final"], final)
    torch.testing.assert_close(features["block1"][:, :-1], block1)  # the class token is last
    features_only = timm.create_model("adventurer_nano_patch4_28", features_only=True, feature_cls="fx",
                                      out_indices=(1, 3)).eval()
    assert [tuple(f.shape) for f in features_only(x)] == [(2, 64, 128)] * 2  # 7x9 patches + class token


def test_global_pool_options_follow_timm():
    x = torch.randn(2, 3, 28, 32)
    model = timm.create_model("adventurer_nano_patch4_28", num_classes=0).eval()
    tokens = model.forward_features(x)  # (B, 7*8 patches + the class token last, C)
    assert tokens.shape == (2, 57, model.embed_dim)
    torch.testing.assert_close(model(x), tokens[:, -1])
    model.reset_classifier(0, "avg")
    torch.testing.assert_close(model(x), tokens[:, :-1].mean(1))
    model.reset_classifier(5, "")  # no pooling: the head classifies every token (timm's convention)
    assert model(x).shape == (2, 57, 5)
    torch.testing.assert_close(model(x), model.head(tokens))
    assert timm.create_model("adventurer_nano_patch4_28", num_classes=0, global_pool="")(x).shape == (2, 57, 128)
    model.reset_classifier(0, "max")
    torch.testing.assert_close(model(x), tokens[:, :-1].amax(1))
    model.reset_classifier(0, "avgmax")
    torch.testing.assert_close(model(x), (tokens[:, :-1].amax(1) + tokens[:, :-1].mean(1)) / 2)
    with pytest.raises(ValueError, match=r"global_pool must be one of 'token', 'avg', 'max', 'avgmax', ''.*got 'map'"):
        timm.create_model("adventurer_nano_patch4_28", global_pool="map")
    with pytest.raises(ValueError, match=r"got 'mean'"):
        model.reset_classifier(3, "mean")


@pytest.mark.parametrize("mixer", ["mamba2", "gla", "hgrn"])
def test_an_empty_batch_gives_an_empty_output(mixer):
    model = timm.create_model("adventurer_nano_patch4_28", mixer=mixer, num_classes=3)
    x = torch.randn(0, 3, 36, 20)
    model(x).sum().backward()
    with torch.no_grad():
        assert model.eval()(x).shape == (0, 3)


def test_bad_inputs_raise_clear_errors():
    model = timm.create_model("adventurer_nano_patch4_28")
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\), got \(1, 28, 28\).*unsqueeze"):
        model(torch.randn(1, 28, 28))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\), got \(2, 1, 28, 28\)"):
        model(torch.randn(2, 1, 28, 28))
    with pytest.raises(TypeError, match="input dtype torch.float64 does not match the model's torch.float32"):
        model(torch.randn(1, 3, 28, 28, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"30x30 is not a multiple of the patch size 4x4"):
        timm.create_model("adventurer_nano_patch4_28", img_size=30)
    with pytest.raises(ValueError, match=r"30x28 is not a multiple"):
        model.set_input_size(img_size=(30, 28))
    with pytest.raises(ValueError, match=r"30x28 is not a multiple of the patch size 4x4.*e\.g\. 28x28|32x28"):
        model(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match="unknown mixer 'rwkv'"):
        timm.create_model("adventurer_nano_patch4_28", mixer="rwkv")
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model("adventurer_giant_patch16_224")
    with pytest.raises(ValueError, match="no mask token"):
        model.forward_features(torch.randn(1, 3, 28, 28), mask=torch.zeros(1, 49, dtype=torch.bool))


def test_a_distilled_export_loads_through_timm_checkpoint_path(tmp_path):
    # timm's train/validate scripts load with `checkpoint_path` and strict=True; the mask token is distillation-only.
    student = timm.create_model("adventurer_nano_patch4_28", use_mask_token=True).eval()
    path = tmp_path / "distilled.safetensors"
    safetensors.torch.save_file(student.state_dict(), str(path))
    plain = timm.create_model("adventurer_nano_patch4_28", checkpoint_path=str(path)).eval()
    x = torch.randn(1, 3, 28, 28)
    torch.testing.assert_close(plain(x), student(x))
    with pytest.raises(RuntimeError, match="Missing key.*mask_token"):  # a model that needs it still asks for it
        timm.create_model("adventurer_nano_patch4_28", use_mask_token=True).load_state_dict(plain.state_dict())


def test_hooks_see_every_block_without_autograd():
    # The no-autograd fast path bypasses module calls and writes in place; a hook must still fire and keep its tensor.
    model = timm.create_model("adventurer_nano_patch4_28", depth=4).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.enable_grad():
        expected = [f.detach() for f in model.forward_intermediates(x, intermediates_only=True, output_fmt="NLC",
                                                                    return_prefix_tokens=False)]
    seen = {}
    names = ["patch_embed", "blocks.1", "blocks.2.mixer", "blocks.3", "norm"]
    handles = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.setdefault(n, o))
               for n in names]
    with torch.no_grad():
        out = model(x)
    assert sorted(seen) == sorted(names)
    torch.testing.assert_close(seen["blocks.1"][:, :-1], expected[1], rtol=1e-4, atol=1e-5)  # not overwritten later
    torch.testing.assert_close(seen["blocks.3"][:, :-1], expected[3], rtol=1e-4, atol=1e-5)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)
    features = timm.create_model("adventurer_nano_patch4_28", features_only=True, feature_cls="hook",
                                 out_indices=(1, 3)).eval()
    with torch.no_grad():
        assert [tuple(f.shape) for f in features(x)] == [(2, 50, 128)] * 2


def test_resampled_position_embedding_follows_writes_that_keep_the_version():
    # Fused optimisers and `.data` writes change a parameter without bumping its version counter.
    model = timm.create_model("adventurer_nano_patch4_28").eval()
    x = torch.randn(1, 3, 36, 52)
    with torch.no_grad():
        before = model(x)
        model.pos_embed.data.mul_(3.0)
        after = model(x)
    with torch.enable_grad():
        reference = model(x).detach()  # the autograd path never caches
    torch.testing.assert_close(after, reference)
    assert not torch.allclose(before, after)


def test_dynamic_img_pad_equals_the_zero_padded_input_at_any_size():
    """timm's ViT option: a side that is not a multiple of the patch is zero-padded at the bottom / right, so the
    model sees exactly the padded image (one token grid for both), with gradients, intermediates and FX alike."""
    torch.manual_seed(0)
    model = timm.create_model("adventurer_nano_patch4_28", num_classes=5, dynamic_img_pad=True).eval()
    x = torch.randn(2, 3, 29, 18)
    padded = torch.nn.functional.pad(x, (0, 2, 0, 3))  # 32 x 20: the next multiples of 4
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded), rtol=0, atol=0)
        _, (stage,) = model.forward_intermediates(x, indices=[1])
    assert stage.shape == (2, model.embed_dim, 8, 5)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    model.train()
    model(x).sum().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    plain = timm.create_model("adventurer_nano_patch4_28", num_classes=5)
    with pytest.raises(ValueError, match="not a multiple of the patch size 4x4"):
        plain(x)
