"""Edge cases of the mixers' three forms and of the streaming block that the main tests do not reach:
conv widths 1-4, n_groups > 1, sequences shorter than the conv, slabs of every size down to one token,
batch 1 and 3, non-contiguous inputs, and inputs that must survive the no-autograd path unchanged."""
import pytest
import torch

from vitlinearizer.models.adventurer_block import AdventurerBlock
from vitlinearizer.models.mixers import create_mixer

CONFIGS = {
    "mamba2-w1": ("mamba2", dict(d_state=8, head_dim=16, d_conv=1)),
    "mamba2-w2-g2": ("mamba2", dict(d_state=8, head_dim=16, d_conv=2, n_groups=2)),
    "mamba2-w3-g4": ("mamba2", dict(d_state=8, head_dim=8, d_conv=3, n_groups=4)),
    "mamba2-w4": ("mamba2", dict(d_state=8, head_dim=16)),
    "gla-w0": ("gla", dict(num_heads=2, conv_size=0)),
    "gla-w2": ("gla", dict(num_heads=2, conv_size=2)),
    "gla-w4": ("gla", dict(num_heads=2)),
    "hgrn-w0": ("hgrn", dict(conv_size=0)),
    "hgrn-w1": ("hgrn", dict(conv_size=1)),
    "hgrn-w3": ("hgrn", dict(conv_size=3)),
}


def mixer_for(case, impl="chunked"):
    name, kwargs = CONFIGS[case]
    torch.manual_seed(0)
    return create_mixer(name, 32, impl=impl, chunk_size=4, **kwargs).double().eval()


def scan_in_slabs(mixer, x, slab):
    state, parts = None, []
    for start in range(0, x.shape[1], slab):
        y, state = mixer.scan(x[:, start:start + slab], state)
        parts.append(y)
    return torch.cat(parts, 1)


@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "no_grad"])
@pytest.mark.parametrize("case", list(CONFIGS))
def test_scan_in_slabs_and_step_loop_equal_forward(case, grad):
    mixer = mixer_for(case)
    for length in (1, 2, 3, 7):  # 1-3: shorter than the conv window
        x = torch.randn(2, length, 32, dtype=torch.float64)
        ref = mixer(x)
        x0 = x.clone()
        with torch.set_grad_enabled(grad):
            for slab in (1, 2, 3, 5, length + 2):
                torch.testing.assert_close(scan_in_slabs(mixer, x, slab), ref, rtol=1e-9, atol=1e-10)
            state, steps = None, []
            for t in range(length):
                y_t, state = mixer.step(x[:, t], state)
                steps.append(y_t)
            torch.testing.assert_close(torch.stack(steps, 1), ref, rtol=1e-9, atol=1e-10)
            if length >= 3:  # the forms hand the state to each other
                y0, state = mixer.scan(x[:, :1])
                y1, state = mixer.step(x[:, 1], state)
                y2, _ = mixer.scan(x[:, 2:], state)
                torch.testing.assert_close(torch.cat([y0, y1[:, None], y2], 1), ref, rtol=1e-9, atol=1e-10)
        assert torch.equal(x, x0)


@pytest.mark.parametrize("case", ["mamba2-w3-g4", "gla-w2", "hgrn-w3"])
def test_scan_does_not_consume_the_state_it_is_given(case):
    # A carried state may be branched (two continuations from one prefix): neither form may write into it.
    mixer = mixer_for(case)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        _, state = mixer.scan(x[:, :5])
        kept = [t.clone() for t in state] if isinstance(state, tuple) else state.clone()
        first, _ = mixer.scan(x[:, 5:], state)
        mixer.step(x[:, 5], state)
        again, _ = mixer.scan(x[:, 5:], state)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    for a, b in zip(state if isinstance(state, tuple) else [state], kept if isinstance(kept, list) else [kept]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["mamba2-w2-g2", "gla-w2", "hgrn-w3"])
@pytest.mark.parametrize("impl", ["chunked", "naive"])
def test_gradcheck_forward_and_scan_from_a_state(case, impl):
    name, kwargs = CONFIGS[case]
    torch.manual_seed(0)
    small = {**kwargs, "head_dim": 8, "d_state": 4, "expand": 1} if name == "mamba2" else kwargs
    if name == "gla":
        small = {**small, "gate_low_rank_dim": 4}
    mixer = create_mixer(name, 16, impl=impl, chunk_size=2, **small).double()
    x = torch.randn(1, 5, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mixer, (x,), eps=1e-6, atol=1e-6)
    _, state = mixer.scan(x[:, :2].detach())
    leaves = [t.detach().clone().requires_grad_() for t in state]

    def rest(x, *state):
        y, after = mixer.scan(x, tuple(state))
        return (y, *after)
    assert torch.autograd.gradcheck(rest, (x[:, 2:].detach().requires_grad_(), *leaves), eps=1e-6, atol=1e-6)


BLOCK_CASES = {
    "mamba2-g2": ("mamba2", dict(d_state=8, head_dim=16, d_conv=2, n_groups=2)),
    "gla": ("gla", dict(num_heads=2)),
    "hgrn-noconv": ("hgrn", dict(conv_size=0)),
}


@pytest.mark.parametrize("flip", [False, True], ids=["raster", "flip"])
@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_streaming_block_splits_anywhere_and_leaves_its_input_alone(case, flip):
    mixer, kwargs = BLOCK_CASES[case]
    torch.manual_seed(0)
    block = AdventurerBlock(32, mixer=mixer, mixer_kwargs={**kwargs, "chunk_size": 4}, flip=flip).double().eval()
    for batch, length in [(1, 1), (3, 2), (1, 6)]:  # length includes the class token (last)
        x = torch.randn(batch, length, 32, dtype=torch.float64)
        ref = block(x)
        strided = torch.zeros(batch, length, 64, dtype=torch.float64)[..., ::2].copy_(x)  # non-contiguous
        for slab in (1, 2, 3, length, length + 1):  # slabs of 1-3 split at every position near both ends
            block.stream_slab_tokens = slab
            for given in (x, strided):
                before = given.clone()
                with torch.no_grad():
                    assert block._streamable(given)
                    out = block(given)
                torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
                assert torch.equal(given, before)


def test_training_block_with_drop_path_keeps_its_randomness_without_autograd():
    torch.manual_seed(0)
    block = AdventurerBlock(32, mixer="gla", mixer_kwargs=dict(num_heads=2), drop_path=0.5).double().train()
    x = torch.randn(8, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        assert not block._streamable(x)
        torch.manual_seed(1)
        fast = block(x)
    torch.manual_seed(1)
    torch.testing.assert_close(fast, block(x))
    assert not torch.allclose(block.eval()(x), fast)  # drop path did act
