"""The student as a timm model: calls a timm user makes on any ViT, compared with timm's own conventions."""
import pytest
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
