"""Token mixers: the recurrent step loop reproduces the parallel forward; implementations agree."""
import pytest
import torch

from vitlinearizer.models.mixers import MIXERS, GatedRMSNorm, create_mixer

CONFIGS = {
    "mamba2": dict(d_state=16, head_dim=16),
    "gla": dict(num_heads=2),
    "hgrn": dict(),
}


def build(name, dim=32, **overrides):
    torch.manual_seed(0)
    return create_mixer(name, dim, **{**CONFIGS[name], **overrides}).double().eval()


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("length", [1, 5, 37])
def test_step_loop_equals_forward(name, length):
    mixer = build(name)
    x = torch.randn(2, length, 32, dtype=torch.float64)
    y = mixer(x)
    state, steps = None, []
    for t in range(length):
        y_t, state = mixer.step(x[:, t], state)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1), y, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_is_causal(name):
    mixer = build(name)
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 12:] += torch.randn_like(x2[:, 12:])
    y, y2 = mixer(x), mixer(x2)
    torch.testing.assert_close(y[:, :12], y2[:, :12])
    assert not torch.allclose(y[:, 12:], y2[:, 12:])


@pytest.mark.parametrize("name", list(MIXERS))
def test_chunked_and_naive_mixers_agree_with_gradients(name):
    fast, ref = build(name, impl="chunked", chunk_size=8), build(name, impl="naive")
    x = torch.randn(2, 29, 32, dtype=torch.float64, requires_grad=True)
    y_fast, y_ref = fast(x), ref(x)
    torch.testing.assert_close(y_fast, y_ref)
    g_fast = torch.autograd.grad(y_fast.square().sum(), [x, *fast.parameters()])
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *ref.parameters()])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b)


def test_mamba2_settings_match_the_paper():
    m = create_mixer("mamba2", 512)
    assert m.num_heads == 16 and m.d_state == 64 and m.d_conv == 4 and m.d_inner == 1024
    assert m.in_proj.bias is None and m.out_proj.bias is None
    a = m.A_log.exp()
    assert (a >= 1).all() and (a <= 16).all()
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert (dt >= 1e-4 - 1e-9).all() and (dt <= 0.1 + 1e-6).all()


def test_mamba2_in_proj_padding_is_inert_and_old_checkpoints_load():
    # Width 384: z 768 + xBC 896 + dt 12 = 1676 outputs, padded to 1680 for the CPU GEMM.
    torch.manual_seed(0)
    m = create_mixer("mamba2", 384).double()
    assert m.in_proj.out_features == 1680
    x = torch.randn(1, 9, 384, dtype=torch.float64)
    y = m(x)
    (grad,) = torch.autograd.grad(y.square().sum(), [m.in_proj.weight])
    assert grad[1676:].abs().sum() == 0 and grad[:1676].abs().sum() > 0
    with torch.no_grad():  # whatever the padding rows hold never reaches the output
        m.in_proj.weight[1676:] = 1e3
    torch.testing.assert_close(m(x), y)

    unpadded = {k: (v[:1676] if k == "in_proj.weight" else v) for k, v in m.state_dict().items()}
    fresh = create_mixer("mamba2", 384).double()
    fresh.load_state_dict(unpadded)  # strict: a checkpoint from before the padding
    torch.testing.assert_close(fresh(x), y)
    with pytest.raises(RuntimeError, match="in_proj.weight"):
        fresh.load_state_dict({**unpadded, "in_proj.weight": unpadded["in_proj.weight"][:1600]})


def test_gated_rmsnorm_normalises_gated_input():
    norm = GatedRMSNorm(8, group_size=4).double()
    y, z = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    g = (y * torch.nn.functional.silu(z)).view(3, 2, 4)
    expected = (g / g.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()).view(3, 8)
    torch.testing.assert_close(norm(y, z), expected)


def test_bad_mixer_arguments():
    with pytest.raises(ValueError, match="unknown mixer 'mamba'.*mamba2, gla, hgrn"):
        create_mixer("mamba", 32)
    with pytest.raises(ValueError, match="multiple of head_dim"):
        create_mixer("mamba2", 40, head_dim=64)
