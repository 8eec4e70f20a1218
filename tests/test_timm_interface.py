"""The student as a timm model: calls a timm user makes on any ViT, compared with timm's own conventions."""
import pytest
import safetensors.torch
import timm
import torch

import vitlinearizer  # noqa: F401  (registers the models)

DEMO = "adventurer_nano_patch4_28"


@pytest.mark.parametrize("grad", [True, False])
def test_an_empty_batch_gives_empty_feature_maps(grad):
    # model(x) takes an empty batch (test_adventurer.py); the NCHW intermediates and features_only must too.
    model = timm.create_model(DEMO, depth=2).eval()
    x = torch.randn(0, 3, 28, 32)
    with torch.set_grad_enabled(grad):
        maps = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape for t in maps] == [(0, 128, 7, 8)] * 2
        features = timm.create_model(DEMO, depth=2, features_only=True, out_indices=(1,)).eval()
        assert [t.shape for t in features(x)] == [(0, 128, 7, 8)]


def test_pruned_model_returns_every_token_like_timm_vit():
    # timm's ViT drops the pooling with the head, so a pruned backbone's forward gives tokens, not the class token.
    model = timm.create_model(DEMO).eval()
    x = torch.randn(2, 3, 28, 28)
    assert model.prune_intermediate_layers([1, 2]) == [1, 2]
    assert len(model.blocks) == 3 and model.num_classes == 0 and model.global_pool == ""
    tokens = model(x)
    assert tokens.shape == (2, 7 * 7 + 1, 128)
    torch.testing.assert_close(tokens, model.forward_features(x))
    vit = timm.create_model("vit_tiny_patch16_224", img_size=28, patch_size=4, depth=3)
    vit.prune_intermediate_layers([1, 2])
    assert vit.global_pool == model.global_pool and vit(x).dim() == 3


TINY = dict(embed_dim=32, depth=2, mixer_kwargs=dict(d_state=8, head_dim=16))


def tiny(**kwargs):
    torch.manual_seed(0)
    return timm.create_model(DEMO, **{**TINY, **kwargs})


def test_timm_data_config_sees_the_channel_count():
    # timm reads `model.in_chans`; without it a 1-channel model was fed 3-channel batches by timm's loaders.
    model_config = pytest.importorskip("timm.data.model_config")
    model = tiny(in_chans=1)
    assert timm.models.get_model_input_config(model)["input_size"] == (1, 28, 28)
    assert model_config.resolve_input_data_config(model)["input_size"] == (1, 28, 28)


def test_set_input_size_keeps_a_frozen_pos_embed_and_updates_timm_record():
    pytest.importorskip("timm.models._input")
    model = tiny()
    model.pos_embed.requires_grad_(False)
    model.set_input_size((28, 56))
    assert model.pos_embed.shape == (1, 7 * 14 + 1, 32) and not model.pos_embed.requires_grad
    # timm's exports (save_for_hf) and data config describe the model at its current size, as for its ViT.
    assert timm.models.get_model_input_config(model)["input_size"] == (3, 28, 56)
    assert model._model_args["img_size"] == (28, 56)


def test_device_and_dtype_factory_arguments_like_timm_vit():
    assert {p.device.type for p in tiny(device="meta").parameters()} == {"meta"}
    model = tiny(dtype=torch.float64, num_classes=3).eval()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(torch.randn(1, 3, 28, 28, dtype=torch.float64)).dtype == torch.float64


def test_reset_classifier_builds_the_head_like_the_model():
    model = tiny().double().eval()
    model.reset_classifier(3)
    assert model.head.weight.dtype == torch.float64 and not model.head.training
    assert model(torch.randn(2, 3, 28, 28, dtype=torch.float64)).shape == (2, 3)


def test_non_square_checkpoint_loads_at_another_size_through_timm(tmp_path):
    from timm.layers import resample_abs_pos_embed
    from timm.models import save_for_hf

    source = tiny(img_size=(24, 32), num_classes=4).eval()  # a 6x8 grid
    export = tmp_path / "export"
    save_for_hf(source, str(export))

    def expected(grid):
        patches = resample_abs_pos_embed(source.pos_embed[:, :-1], list(grid), [6, 8], num_prefix_tokens=0)
        return torch.cat([patches, source.pos_embed[:, -1:]], 1)

    # The same 48 positions as 8x6: loaded unchanged, the rows and columns of the grid were swapped silently.
    transposed = timm.create_model(f"local-dir:{export}", pretrained=True, img_size=(32, 24))
    torch.testing.assert_close(transposed.pos_embed, expected((8, 6)))
    same = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
    x = torch.randn(1, 3, 24, 32)
    torch.testing.assert_close(same(x), source(x), rtol=0, atol=0)
    # A plain state dict with its size stated in the pretrained cfg, as timm's ViT takes it.
    weights = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(source.state_dict(), str(weights))
    square = tiny(img_size=32, num_classes=4, pretrained=True,
                  pretrained_cfg_overlay=dict(file=str(weights), input_size=(3, 24, 32)))
    torch.testing.assert_close(square.pos_embed, expected((8, 8)))
    with pytest.raises(ValueError, match="non-square pos_embed with 48 patch positions"):
        tiny(img_size=32, num_classes=4, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
