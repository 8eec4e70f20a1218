"""The speed paths against their references: factored chunked kernel, chunk-state carry, token-major conv,
mixer ``scan`` segments, the streaming Adventurer block and the no-autograd in-place model forward."""
import math

import pytest
import timm
import torch
import torch.nn as nn
from mixer_cases import MIXER_CASES

import vitlinearizer  # noqa: F401
from vitlinearizer.models.adventurer_block import AdventurerBlock
from vitlinearizer.models.mixers import GatedRMSNorm, causal_depthwise_conv, create_mixer
from vitlinearizer.ops import _serial as serial_mod
from vitlinearizer.ops import chunked as chunked_mod
from vitlinearizer.ops import linear_recurrence
from vitlinearizer.ops.chunked import chunked_linear_recurrence


def rel_err(ref, other):
    return ((ref - other).double().pow(2).mean().sqrt() / ref.double().pow(2).mean().sqrt().clamp_min(1e-3)).item()


def inputs(batch, length, heads, groups, key_dim, value_dim, per_channel, seed=0, scale=1.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, groups, key_dim, generator=gen, dtype=dtype) / math.sqrt(key_dim)
    k = torch.randn(batch, length, groups, key_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, length, heads, value_dim, generator=gen, dtype=dtype)
    shape = (batch, length, heads, key_dim) if per_channel else (batch, length, heads)
    a = -torch.rand(shape, generator=gen, dtype=dtype) * scale
    s0 = torch.randn(batch, heads, key_dim, value_dim, generator=gen, dtype=dtype)
    return [t.requires_grad_() for t in (q, k, v, a, s0)]


def outputs_and_grads(fn, ins, seed=1):
    y, s = fn(*ins)
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    ds = torch.randn(s.shape, generator=gen, dtype=s.dtype)
    return y, s, torch.autograd.grad((y * dy).sum() + (s * ds).sum(), ins)


@pytest.mark.parametrize("method", ["auto", "exact"])
@pytest.mark.parametrize("per_channel,groups", [(False, 1), (False, 2), (True, 4)], ids=["head_g1", "head_g2", "chan"])
@pytest.mark.parametrize("length,chunk", [(1, 8), (37, 8), (300, 8)])  # 300/8 = 38 chunks
def test_chunked_methods_match_naive(method, per_channel, groups, length, chunk):
    ins = inputs(2, length, 4, groups, 5, 3, per_channel, seed=length)
    ref = outputs_and_grads(lambda *t: linear_recurrence(*t[:4], initial_state=t[4], return_final_state=True,
                                                          impl="naive"), ins)
    got = outputs_and_grads(lambda *t: chunked_linear_recurrence(*t[:4], t[4], True, chunk, method=method), ins)
    assert rel_err(ref[0], got[0]) < 1e-10 and rel_err(ref[1], got[1]) < 1e-10
    for a, b in zip(ref[2], got[2]):
        assert rel_err(a, b) < 1e-10
    with torch.no_grad():  # the in-place (no autograd) variant
        y, s = chunked_linear_recurrence(*[t.detach() for t in ins[:4]], ins[4].detach(), True, chunk, method=method)
    assert rel_err(ref[0], y) < 1e-10 and rel_err(ref[1], s) < 1e-10


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_large_spans_fall_back_to_exact(per_channel, monkeypatch):
    ins = [t.detach() for t in inputs(1, 200, 2, 2, 4, 3, per_channel, seed=3, scale=20.0)]
    ref = linear_recurrence(*ins[:4], initial_state=ins[4], impl="naive")
    calls = []
    exact = chunked_mod._per_channel_exact if per_channel else chunked_mod._per_head_exact
    name = "_per_channel_exact" if per_channel else "_per_head_exact"
    monkeypatch.setattr(chunked_mod, name, lambda *a: calls.append(1) or exact(*a))
    y, _ = chunked_linear_recurrence(*ins[:4], ins[4])
    assert calls and rel_err(ref, y) < 1e-8
    # Even with the span guard switched off, the overflow check catches inf/nan and recomputes exactly.
    calls.clear()
    monkeypatch.setattr(chunked_mod, "MAX_FACTORED_SPAN", 1e9)
    y, _ = chunked_linear_recurrence(*[t.float() for t in ins[:4]], ins[4].float(), chunk_size=64)
    assert calls and torch.isfinite(y).all() and rel_err(ref, y) < 1e-3


@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_span_too_large_for_a_chunk_halves_it_before_going_exact(per_channel, monkeypatch):
    # -2.5 per token: a 128-token chunk spans 320 and a 64-token one 160 (> MAX_FACTORED_SPAN = 100), a
    # 32-token one 80: the factored path must run at 32 instead of handing the whole call to the exact path.
    ins = [t.detach() for t in inputs(1, 200, 2, 2, 4, 3, per_channel, seed=3)]
    ins[3] = torch.full_like(ins[3], -2.5)
    exact = "_per_channel_exact" if per_channel else "_per_head_exact"
    monkeypatch.setattr(chunked_mod, exact, lambda *a: pytest.fail("exact path used"))
    factored_name = "_per_channel_factored" if per_channel else "_per_head_factored"
    factored, sizes = getattr(chunked_mod, factored_name), []
    monkeypatch.setattr(chunked_mod, factored_name, lambda *a: sizes.append(a[5]) or factored(*a))
    ref_y, ref_s = linear_recurrence(*ins[:4], initial_state=ins[4], return_final_state=True, impl="naive")
    y, s = chunked_linear_recurrence(*ins[:4], ins[4], True, 128)
    assert sizes == [128, 64, 32]
    assert rel_err(ref_y, y) < 1e-10 and rel_err(ref_s, s) < 1e-10


def test_auto_takes_the_factored_path_for_model_like_decays(monkeypatch):
    ins = [t.detach() for t in inputs(1, 130, 4, 1, 8, 8, False, scale=0.5)]
    monkeypatch.setattr(chunked_mod, "_per_head_exact", lambda *a: pytest.fail("exact path used"))
    chunked_linear_recurrence(*ins[:4])


def _plain_chunk_carry(states, half, init):
    """S_{c+1} = exp(2 half_c) S_c + exp(half_c) states_c; returns (exp(half_c) S_c for every c, S_C)."""
    state, entering = init, []
    for c in range(states.shape[1]):
        entering.append(state * half[:, c].exp())
        state = state * (2 * half[:, c]).exp() + states[:, c] * half[:, c].exp()
    return torch.stack(entering, 1), state


def test_factored_chunk_carry_matches_the_plain_recurrence():
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(2, 70, 3, 5, generator=gen, dtype=torch.float64)  # (B, C, *S)
    half = -torch.rand(2, 70, 3, 1, generator=gen, dtype=torch.float64) * 3
    init = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    expected = _plain_chunk_carry(states, half, init)
    with torch.no_grad():  # the in-place path (it overwrites its copy of the states)
        got = chunked_mod._carry_factored(states.clone(), half, init)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    args = [t[:, :6].clone().requires_grad_() for t in (states, half)] + [init.clone().requires_grad_()]
    got, expected = chunked_mod._carry_factored(*args), _plain_chunk_carry(*args)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    weights = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in expected]
    grads = [torch.autograd.grad(sum((w * t).sum() for w, t in zip(weights, out)), args) for out in (got, expected)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("decay_rows", [1, 7], ids=["per_head_decay", "per_row_decay"])
@pytest.mark.parametrize("carry", ["factored", "exact"])
def test_chunk_carry_in_serial_pieces_matches_the_plain_recurrence(decay_rows, carry, monkeypatch):
    # A grain of 4 elements cuts a state of 7 rows of 2 into pieces of 2 rows, the last one short; the decay
    # broadcasts over the rows (per head) or has one per row (per channel).
    monkeypatch.setattr(serial_mod, "ATEN_GRAIN_SIZE", 4)
    monkeypatch.setattr(serial_mod, "SERIAL_UPDATES", True)
    gen = torch.Generator().manual_seed(1)
    states = torch.randn(1, 9, 7, 2, generator=gen, dtype=torch.float64)
    half = -torch.rand(1, 9, decay_rows, 1, generator=gen, dtype=torch.float64) * 3
    init = torch.randn(1, 7, 2, generator=gen, dtype=torch.float64)
    assert [s.indices(7) for s in serial_mod.serial_slices(states[:, 0], dim=1)] == [
        (0, 2, 1), (2, 4, 1), (4, 6, 1), (6, 7, 1)]
    if carry == "factored":
        expected = _plain_chunk_carry(states, half, init)
        with torch.no_grad():
            got = chunked_mod._carry_factored(states.clone(), half, init)
    else:  # the exact paths' carry: S_{c+1} = decay_c * S_c + states_c
        decay = (2 * half).exp()
        expected = _plain_exact_carry(states, decay, init)
        with torch.no_grad():
            got = chunked_mod._carry_states(states, decay, init)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def _plain_exact_carry(states, decay, init):
    state, entering = init, []
    for c in range(states.shape[1]):
        entering.append(state)
        state = decay[:, c] * state + states[:, c]
    return torch.stack(entering, 1), state


@pytest.mark.parametrize("length", [1, 2, 3, 10])
def test_token_major_conv_matches_conv1d_and_carries_segments(length):
    torch.manual_seed(0)
    conv = nn.Conv1d(6, 6, 4, groups=6, padding=3).double()
    x = torch.randn(2, length + 7, 6, dtype=torch.float64)
    ref = conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)
    out = causal_depthwise_conv(x, conv.weight[:, 0], conv.bias)
    torch.testing.assert_close(out, ref)
    head, tail = x[:, :7], x[:, 7:]  # second segment of `length` tokens with the previous 3 inputs carried
    torch.testing.assert_close(causal_depthwise_conv(tail, conv.weight[:, 0], conv.bias, head[:, -3:]), ref[:, 7:])


@pytest.mark.parametrize("case", list(MIXER_CASES))
def test_mixer_scan_segments_equal_forward_and_continue_with_step(case):
    name, kwargs = MIXER_CASES[case]
    torch.manual_seed(0)
    mixer = create_mixer(name, 32, **kwargs, chunk_size=8).double().eval()
    x = torch.randn(2, 41, 32, dtype=torch.float64)
    ref = mixer(x)
    with torch.no_grad():
        torch.testing.assert_close(mixer(x), ref)  # in-place no-autograd path
        state, parts = None, []
        for a, b in [(0, 1), (1, 3), (3, 20), (20, 41)]:
            y, state = mixer.scan(x[:, a:b], state)
            parts.append(y)
        torch.testing.assert_close(torch.cat(parts, 1), ref)
        y, state = mixer.scan(x[:, :30])
        steps = []
        for t in range(30, 41):
            y_t, state = mixer.step(x[:, t], state)
            steps.append(y_t)
        torch.testing.assert_close(torch.stack(steps, 1), ref[:, 30:])


def test_gated_rmsnorm_leaves_z_alone_unless_told():
    norm = GatedRMSNorm(8, group_size=4).double()
    y, z = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    ref = norm(y, z)
    z0 = z.clone()
    with torch.no_grad():
        torch.testing.assert_close(norm(y, z), ref)
        assert torch.equal(z, z0)
        torch.testing.assert_close(norm(y, z, overwrite_z=True), ref)


def test_gated_rmsnorm_multiplies_a_bf16_gate_in_float32_as_autograd_does():
    # Under autocast in_proj gives a bf16 z and the kernel a float32 y: the in-place product used to stay bf16
    # (errors of ~1e-2 against the autograd path).
    norm = GatedRMSNorm(64)
    y, z = torch.randn(2, 10, 64) * 3, torch.randn(2, 10, 64).bfloat16()
    ref = norm(y, z)
    with torch.no_grad():
        for overwrite_z in (False, True):
            torch.testing.assert_close(norm(y, z.clone(), overwrite_z=overwrite_z), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(MIXER_CASES))
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("slab", [0, 4, 16, 41])
def test_streaming_block_equals_parallel_block(case, flip, slab):
    mixer, kwargs = MIXER_CASES[case]
    torch.manual_seed(0)
    block = AdventurerBlock(32, mixer=mixer, mixer_kwargs=kwargs, flip=flip).double().eval()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    ref = block(x)  # autograd on: the parallel reference path
    block.stream_slab_tokens = slab
    with torch.no_grad():
        assert block._streamable(x)
        torch.testing.assert_close(block(x), ref)
        x2 = x.clone()
        out = block._forward_streaming(x2, out=x2)  # in place, as Adventurer.forward_features runs it
        assert out.data_ptr() == x2.data_ptr()
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("mixer", ["mamba2", "gla"])
def test_streaming_block_compiles_whole_for_inference(mixer, monkeypatch):
    # torch.compile(fullgraph=True) of the no-autograd path: slabs carrying state, the kernel in segments,
    # in-place temporaries, and the exact kernel's chunk carry (without the `out=` views dynamo refuses, and
    # without torch calls that return a dtype).
    monkeypatch.setattr(chunked_mod, "SEGMENT_TOKENS", 8)
    torch.manual_seed(0)
    block = AdventurerBlock(32, mixer=mixer, mixer_kwargs=dict(MIXER_CASES[mixer][1], chunk_size=8), flip=True).eval()
    block.stream_slab_tokens = 16
    x = torch.randn(2, 40, 32)
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), block(x), rtol=1e-4, atol=1e-5)


def test_model_inference_path_equals_autograd_path():
    model = timm.create_model("adventurer_tiny_patch16_224", depth=4, num_classes=7).double().eval()
    for block in model.blocks:
        block.stream_slab_tokens = 16
    x = torch.randn(2, 3, 96, 112, dtype=torch.float64)
    ref = model.forward_features(x)  # autograd: parallel blocks, conv patch embed semantics
    with torch.no_grad():
        fast = model.forward_features(x)  # streaming blocks, in place, cached resampled pos embed
        torch.testing.assert_close(fast, ref)
        torch.testing.assert_close(model.forward_features(x), ref)  # second call uses the cached pos embed
        conv = model.patch_embed(x)
        torch.testing.assert_close(model._patchify(x), conv)
        model.pos_embed.add_(1.0)  # an in-place update of the weights invalidates the cache
        moved = model.forward_features(x)
    with torch.enable_grad():
        torch.testing.assert_close(moved, model.forward_features(x))
    final, inter = model.forward_intermediates(x.detach(), indices=[1, 3])
    with torch.no_grad():
        final2, inter2 = model.forward_intermediates(x, indices=[1, 3])
    torch.testing.assert_close(final2, final)
    for a, b in zip(inter, inter2):
        torch.testing.assert_close(a, b)


def test_bf16_streaming_forward_is_close_to_float32():
    model = timm.create_model("adventurer_nano_patch4_28").eval()
    for block in model.blocks:
        block.stream_slab_tokens = 32
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ref = model(x)
        out = model.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16 and rel_err(ref, out.float()) < 0.1


@pytest.mark.parametrize("mixer", ["mamba2", "gla", "hgrn"])
def test_autocast_streaming_forward_matches_the_parallel_form(mixer):
    # Under autocast the mixers and MLPs return bf16 while the residual stream stays float32, in both forms;
    # the streaming form used to keep its residual in bf16 and failed to write a flipped block's rows back.
    model = timm.create_model("adventurer_nano_patch4_28", mixer=mixer).eval()
    for block in model.blocks:
        block.stream_slab_tokens = 32  # several slabs
    x = torch.randn(2, 3, 36, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model.forward_features(x)
        with torch.no_grad():
            fast = model.forward_features(x)
    assert fast.dtype == ref.dtype == torch.float32
    assert rel_err(ref.detach(), fast) < 1e-2
    with torch.no_grad():
        assert rel_err(model.forward_features(x), fast) < 0.1  # and close to float32 throughout


def test_meta_device_forward_runs_for_flop_counting():
    with torch.device("meta"):
        model = timm.create_model("adventurer_nano_patch4_28").eval()
        x = torch.empty(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (1, 10)


@pytest.mark.parametrize("method", ["auto", "exact"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_head", "per_channel"])
def test_no_grad_long_sequences_run_in_segments(per_channel, method, monkeypatch):
    # 300 tokens, chunks of 8: segments of whole chunks (the kernel writes each straight into the output),
    # then the 4 tokens left over as a chunk of their own.
    monkeypatch.setattr(chunked_mod, "SEGMENT_TOKENS", 40)
    assert chunked_mod._segments(300, 8)[-1] == (296, 300)
    ins = [t.detach() for t in inputs(2, 300, 3, 3 if per_channel else 1, 4, 5, per_channel, seed=9)]
    ref_y, ref_s = linear_recurrence(*ins[:4], initial_state=ins[4], return_final_state=True, impl="naive")
    with torch.no_grad():
        y, s = chunked_linear_recurrence(*ins[:4], ins[4], True, 8, method=method)
    assert rel_err(ref_y, y) < 1e-10 and rel_err(ref_s, s) < 1e-10
    with torch.no_grad():  # bf16 inputs: computed in float32, each segment copied into the bf16 output
        y16, s16 = chunked_linear_recurrence(*[t.bfloat16() for t in ins[:4]], ins[4].float(), True, 8, method=method)
    assert y16.dtype == torch.bfloat16 and s16.dtype == torch.float32
    assert rel_err(ref_y.float(), y16.float()) < 2e-2 and rel_err(ref_s.float(), s16) < 2e-2


@pytest.mark.parametrize("length,align", [(1, 8), (7, 8), (64, 8), (3000, 64), (4097, 64), (8193, 64), (6000, 128)])
def test_segments_cover_the_sequence_in_whole_chunks(length, align):
    pieces = chunked_mod._segments(length, align)
    assert pieces[0][0] == 0 and pieces[-1][1] == length
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))  # contiguous, no overlap
    if len(pieces) > 1:
        assert all((stop - start) % align == 0 for start, stop in pieces[:-1])
        assert (pieces[-1][1] - pieces[-1][0]) % align == 0 or pieces[-1][1] - pieces[-1][0] < align
        assert max(stop - start for start, stop in pieces) <= 1.5 * chunked_mod.SEGMENT_TOKENS + align
    else:
        assert length < 1.5 * chunked_mod.SEGMENT_TOKENS


@pytest.mark.parametrize("groups,per_channel", [(1, False), (2, False), (4, True)],
                         ids=["per_head_1_group", "per_head_2_groups", "per_channel"])
def test_factored_chunk_carry_with_and_without_autograd(groups, per_channel):
    ins = inputs(2, 150, 4, groups, 5, 3, per_channel, seed=4)  # 19 chunks of 8
    ref = outputs_and_grads(lambda *t: linear_recurrence(*t[:4], initial_state=t[4], return_final_state=True,
                                                          impl="naive"), ins)
    got = outputs_and_grads(lambda *t: chunked_linear_recurrence(*t[:4], t[4], True, 8, method="auto"), ins)
    for a, b in zip([ref[0], ref[1], *ref[2]], [got[0], got[1], *got[2]]):
        assert rel_err(a, b) < 1e-10
    # Without autograd (in-place temporaries), from a given and from a zero state.
    for initial in (ins[4].detach(), None):
        ref_y, ref_s = linear_recurrence(*[t.detach() for t in ins[:4]], initial_state=initial,
                                         return_final_state=True, impl="naive")
        with torch.no_grad():
            y, s = chunked_linear_recurrence(*[t.detach() for t in ins[:4]], initial, True, 8, method="auto")
        assert rel_err(ref_y, y) < 1e-10 and rel_err(ref_s, s) < 1e-10
