"""Token mixers: the recurrent step loop reproduces the parallel forward; implementations agree."""
import pytest
import torch

from mixer_cases import MIXER_CASES

from vitlinearizer.models.mixers import GatedRMSNorm, ShortConv, create_mixer

def build(case, dim=32, **overrides):
    name, kwargs = MIXER_CASES[case]
    torch.manual_seed(0)
    return create_mixer(name, dim, **{**kwargs, **overrides}).double().eval()


@pytest.mark.parametrize("name", list(MIXER_CASES))
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


@pytest.mark.parametrize("name", list(MIXER_CASES))
def test_mixer_is_causal(name):
    mixer = build(name)
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 12:] += torch.randn_like(x2[:, 12:])
    y, y2 = mixer(x), mixer(x2)
    torch.testing.assert_close(y[:, :12], y2[:, :12])
    assert not torch.allclose(y[:, 12:], y2[:, 12:])


@pytest.mark.parametrize("name", list(MIXER_CASES))
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


@pytest.mark.parametrize("activation", [True, False])
def test_short_conv_is_a_causal_conv1d_and_steps_from_its_window(activation):
    torch.manual_seed(0)
    conv = ShortConv(6, 4, activation=activation).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    ref = torch.nn.functional.conv1d(x.transpose(1, 2), conv.weight, None, padding=3, groups=6)[..., :9].transpose(1, 2)
    ref = torch.nn.functional.silu(ref) if activation else ref
    y, window = conv(x, want_state=True)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(window, x[:, -3:])
    head, short = conv(x[:, :2], want_state=True)  # a segment shorter than the window: zeros fill the rest
    torch.testing.assert_close(short, torch.cat([x.new_zeros(2, 1, 6), x[:, :2]], 1))
    rest, _ = conv(x[:, 2:], prev=short)
    torch.testing.assert_close(torch.cat([head, rest], 1), ref)
    state, steps = None, []
    for t in range(9):
        y_t, state = conv.step(x[:, t], state)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps, 1), ref)


def test_short_conv_with_bias_and_width_one():
    torch.manual_seed(0)
    conv = ShortConv(5, 1, bias=True).double()  # Mamba-2 with d_conv=1: a per-channel scale and bias
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    y, window = conv(x, want_state=True)
    torch.testing.assert_close(y, torch.nn.functional.silu(x * conv.weight[:, 0, 0] + conv.bias))
    assert window.shape == (2, 0, 5)  # no past inputs to keep (not the whole segment)
    y_t, window = conv.step(x[:, 0], window)
    torch.testing.assert_close(y_t, y[:, 0])
    assert window.shape == (2, 0, 5)


def test_short_conv_loads_its_older_nested_weight_name():
    conv = ShortConv(6, 4)
    old = {"conv1d.weight": torch.randn(6, 1, 4)}  # a GLA/HGRN checkpoint of the earlier layout
    conv.load_state_dict(dict(old))
    torch.testing.assert_close(conv.weight, old["conv1d.weight"])


@pytest.mark.parametrize("name", ["gla", "hgrn"])
def test_checkpoint_without_the_short_conv_loads_as_that_layer(name):
    plain = build(f"{name}-noconv")
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    mixer = build(name)
    mixer.load_state_dict(plain.state_dict())  # strict
    assert mixer.conv is None
    torch.testing.assert_close(mixer(x), plain(x))
    y, state = mixer.scan(x)
    assert isinstance(state, torch.Tensor)  # the conv-less state format
    with pytest.raises(RuntimeError, match=r"conv\.weight"):  # a conv checkpoint still needs its conv
        plain.load_state_dict(build(name).state_dict())
    other = build(name)
    other.load_state_dict({}, strict=False)  # a partial load that does not reach this layer keeps the conv
    assert other.conv is not None


def test_bad_mixer_arguments():
    with pytest.raises(ValueError, match="unknown mixer 'mamba'.*mamba2, gla, hgrn"):
        create_mixer("mamba", 32)
    with pytest.raises(ValueError, match="multiple of head_dim"):
        create_mixer("mamba2", 40, head_dim=64)
    with pytest.raises(ValueError, match="width must be at least 1 .got -1.*conv_size=0"):
        create_mixer("gla", 32, conv_size=-1)
