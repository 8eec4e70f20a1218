import math

import pytest
import torch
import torch.nn.functional as F

from vitlinearizer.objectives import (
    activation_matching_loss,
    cosine_similarity_map,
    logit_kd_loss,
    masked_prediction_loss,
)

DT = torch.float64


def _rand(*shape, seed=0, dtype=DT, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)


def _rand_visible(b, l, p=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    vis = torch.rand(b, l, generator=g) < p
    vis[:, 0] = True  # every image keeps at least one token
    return vis


def _reference(s_list, t_list, visible):
    """Naive per-image gather implementation of the documented formula."""
    stage_vals = []
    for s, t in zip(s_list, t_list):
        vals = []
        for b in range(s.shape[0]):
            idx = visible[b].nonzero().flatten()
            if idx.numel() == 0:
                continue
            rows = []
            for x in (s[b, idx], t[b, idx]):
                a = F.cosine_similarity(x[:, None, :], x[None, :, :], dim=-1, eps=1e-12)
                rows.append(a / a.norm(dim=-1, keepdim=True))
            vals.append((1 - (rows[0] * rows[1]).sum(-1)).mean())
        stage_vals.append(torch.stack(vals).mean())
    return torch.stack(stage_vals).mean()


def _stages(b=3, l=10, widths=((8, 12), (5, 7)), seed=0, requires_grad=False):
    s = [_rand(b, l, cs, seed=seed + 2 * k, requires_grad=requires_grad) for k, (cs, _) in enumerate(widths)]
    t = [_rand(b, l, ct, seed=seed + 2 * k + 1) for k, (_, ct) in enumerate(widths)]
    return s, t


# ---------------------------------------------------------------- activation matching


def test_matches_naive_reference_with_mask():
    s, t = _stages()
    vis = _rand_visible(3, 10)
    got = activation_matching_loss(s, t, vis)
    torch.testing.assert_close(got, _reference(s, t, vis))


def test_zero_for_identical_and_rescaled_features():
    t = [_rand(2, 9, 6, seed=1), _rand(2, 9, 4, seed=2)]
    vis = _rand_visible(2, 9, seed=3)
    assert activation_matching_loss([x.clone() for x in t], t, vis).abs() < 1e-12
    scale = _rand(2, 9, 1, seed=4).abs() + 0.1  # per-token positive scale
    scaled = [x * scale for x in t]
    assert activation_matching_loss(scaled, t, vis).abs() < 1e-12
    assert activation_matching_loss(t, scaled, vis).abs() < 1e-12
    # a negative per-token scale flips signs of that token's similarities: must not be zero
    flipped = [x * torch.where(torch.arange(9) == 2, -1.0, 1.0).to(DT)[None, :, None] for x in t]
    assert activation_matching_loss(flipped, t) > 1e-3


def test_zero_under_orthogonal_width_change():
    t = _rand(2, 11, 6, seed=5)
    q, _ = torch.linalg.qr(_rand(16, 6, seed=6))  # (16, 6) orthonormal columns
    s = t @ q.T  # (2, 11, 16): same Gram matrix, different width
    assert activation_matching_loss([s], [t]).abs() < 1e-12
    assert activation_matching_loss(s, t, _rand_visible(2, 11, seed=7)).abs() < 1e-12


def test_range_and_positive_for_unrelated():
    s, t = _stages(seed=10)
    val = activation_matching_loss(s, t)
    assert 0.0 < val.item() <= 2.0
    assert val.item() > 1e-2
    # anti-aligned rows reach the upper end: student map = -teacher map is impossible
    # for Gram matrices, so just bound it
    for seed in range(5):
        s, t = _stages(seed=20 + seed)
        v = activation_matching_loss(s, t, _rand_visible(3, 10, seed=seed)).item()
        assert 0.0 < v <= 2.0


def test_only_visible_tokens_matter():
    s, t = _stages(seed=30)
    vis = _rand_visible(3, 10, seed=31)
    base = activation_matching_loss(s, t, vis)
    s2, t2 = [x.clone() for x in s], [x.clone() for x in t]
    for x in s2 + t2:
        x[~vis] = float("nan")  # even non-finite garbage at masked positions is ignored
    torch.testing.assert_close(activation_matching_loss(s2, t2, vis), base, rtol=0, atol=0)
    b, l = vis.nonzero()[1].tolist()
    s3 = [x.clone() for x in s]
    s3[0][b, l] += 1.0
    assert (activation_matching_loss(s3, t, vis) - base).abs() > 1e-6


@pytest.mark.parametrize("block", [1, 3, 4, 7, 10, 64])
def test_row_blocks_equal_full_value_and_grad(block):
    vis = _rand_visible(3, 10, seed=40)
    s, t = _stages(seed=41, requires_grad=True)
    full = activation_matching_loss(s, t, vis)
    g_full = torch.autograd.grad(full, s)
    blocked = activation_matching_loss(s, t, vis, row_block_size=block)
    g_blk = torch.autograd.grad(blocked, s)
    torch.testing.assert_close(blocked, full, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_blk, g_full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_anchors_cover_all_visible_equals_full():
    vis = _rand_visible(3, 10, seed=50)
    s, t = _stages(seed=51)
    full = activation_matching_loss(s, t, vis)
    k = int(vis.sum(1).max())
    for kk in (k, k + 2, 10, 100):
        for block in (None, 2):
            got = activation_matching_loss(
                s, t, vis, num_anchors=kk, row_block_size=block, generator=torch.Generator().manual_seed(0)
            )
            torch.testing.assert_close(got, full, rtol=1e-12, atol=1e-12)


def test_anchors_unbiased_estimate():
    vis = _rand_visible(2, 12, p=0.7, seed=60)
    vis[:, -3:] = True
    s, t = _stages(b=2, l=12, seed=61)
    s = [x.clone() for x in t]
    s[0][:, -3:] = _rand(2, 3, s[0].shape[-1], seed=62)  # uneven per-row losses: a biased draw shows
    full = activation_matching_loss(s, t, vis).item()
    # Replicating the batch gives many independent anchor draws per call at the same full loss.
    rep = 500
    s_rep, t_rep, vis_rep = [x.repeat(rep, 1, 1) for x in s], [x.repeat(rep, 1, 1) for x in t], vis.repeat(rep, 1)
    torch.testing.assert_close(activation_matching_loss(s_rep, t_rep, vis_rep).item(), full)
    gen = torch.Generator().manual_seed(123)
    vals = torch.stack([activation_matching_loss(s_rep, t_rep, vis_rep, num_anchors=3, generator=gen) for _ in range(20)])
    single = torch.stack([activation_matching_loss(s, t, vis, num_anchors=3, generator=gen) for _ in range(10)])
    assert single.std() > 1e-3  # it really is a random subset
    assert (vals.mean() - full).abs() < 4 * vals.std() / math.sqrt(len(vals)) + 1e-9
    # reproducible with the same generator seed
    a = activation_matching_loss(s, t, vis, num_anchors=3, generator=torch.Generator().manual_seed(5))
    b = activation_matching_loss(s, t, vis, num_anchors=3, generator=torch.Generator().manual_seed(5))
    assert a == b


def test_grad_flows_to_student_and_inputs_untouched():
    s, t = _stages(seed=70, requires_grad=True)
    vis = _rand_visible(3, 10, seed=71)
    s_copy, t_copy, vis_copy = [x.detach().clone() for x in s], [x.clone() for x in t], vis.clone()
    for kwargs in ({}, {"row_block_size": 3}, {"num_anchors": 2, "generator": torch.Generator().manual_seed(0)}):
        loss = activation_matching_loss(s, t, vis, **kwargs)
        grads = torch.autograd.grad(loss, s)
        for g in grads:
            assert torch.isfinite(g).all() and g.abs().sum() > 0
            assert (g[~vis] == 0).all()  # invisible tokens get no gradient
    assert all(torch.equal(a, b) for a, b in zip(s, s_copy))
    assert all(torch.equal(a, b) for a, b in zip(t, t_copy))
    assert torch.equal(vis, vis_copy)
    assert all(not x.requires_grad for x in t)


def test_per_image_variable_visible_counts():
    s, t = _stages(b=3, l=10, seed=80)
    vis = torch.zeros(3, 10, dtype=torch.bool)
    vis[0, :2] = True
    vis[1, 3:10] = True
    vis[2] = True
    whole = activation_matching_loss(s, t, vis)
    per = [activation_matching_loss([x[b : b + 1] for x in s], [x[b : b + 1] for x in t], vis[b : b + 1]) for b in range(3)]
    torch.testing.assert_close(whole, torch.stack(per).mean())


def test_zero_visible_images_contribute_nothing():
    s, t = _stages(b=3, l=10, seed=90, requires_grad=True)
    vis = _rand_visible(3, 10, seed=91)
    vis[1] = False
    keep = [0, 2]
    expected = activation_matching_loss([x[keep] for x in s], [x[keep] for x in t], vis[keep])
    torch.testing.assert_close(activation_matching_loss(s, t, vis), expected)
    none = activation_matching_loss(s, t, torch.zeros(3, 10, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad
    none.backward()


def test_zero_norm_token_is_finite():
    s, t = _stages(seed=95, requires_grad=True)
    s0 = [x.detach().clone() for x in s]
    s0[0][0, 4] = 0.0
    s0 = [x.requires_grad_() for x in s0]
    loss = activation_matching_loss(s0, t)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(x.grad).all() for x in s0)


def test_float32_under_bf16_autocast():
    s, t = _stages(seed=100)
    s32, t32 = [x.float() for x in s], [x.float() for x in t]
    ref = activation_matching_loss(s32, t32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = activation_matching_loss([x.bfloat16() for x in s32], t32)
        got2 = activation_matching_loss(s32, t32)
    assert got.dtype == torch.float32 and got2.dtype == torch.float32
    torch.testing.assert_close(got2, ref)  # autocast must not lower the matmul precision
    assert (got - ref).abs() < 1e-2  # bf16 inputs only lose input precision


def test_cosine_similarity_map():
    x = _rand(2, 5, 3, seed=110)
    vis = _rand_visible(2, 5, seed=111)
    a = cosine_similarity_map(x, vis)
    expected = F.cosine_similarity(x[:, :, None], x[:, None, :], dim=-1)
    m = vis[:, :, None] & vis[:, None, :]
    torch.testing.assert_close(a[m], expected[m])
    assert (a[~m] == 0).all()


def test_activation_matching_bad_inputs():
    s, t = _stages()
    vis = _rand_visible(3, 10)
    cases = [
        (([], t, vis), "empty"),
        ((s, t[:1], vis), "number of stages"),
        (([s[0], s[1][:2]], t, vis), "batch size"),
        ((s, [t[0][:, :9], t[1]], vis), "token count"),
        ((s, t, vis[:, :9]), "shape"),
        ((s, t, vis.float()), "bool"),
        (([s[0][0]], [t[0][0]], None), "(B, L, C)"),
        (([s[0].long()], [t[0].long()], None), "floating"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            activation_matching_loss(*args)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="row_block_size"):
            activation_matching_loss(s, t, vis, row_block_size=bad)
        with pytest.raises(ValueError, match="num_anchors"):
            activation_matching_loss(s, t, vis, num_anchors=bad)


# ---------------------------------------------------------------- masked prediction


def test_masked_prediction_hand_computed():
    pred = torch.tensor([[[0.0, 0.0], [3.0, 0.5]], [[1.0, 1.0], [0.0, 0.0]]], dtype=DT)
    target = torch.zeros_like(pred)
    masked = torch.tensor([[False, True], [True, True]])
    # token losses: (2.5 + 0.125)/2 = 1.3125, (0.5 + 0.5)/2 = 0.5, 0 -> pooled over 3 tokens
    expected = (1.3125 + 0.5 + 0.0) / 3
    assert masked_prediction_loss(pred, target, masked).item() == pytest.approx(expected, abs=1e-12)
    # beta = 2: 0.5*x^2/2 for |x|<2 else |x|-1 -> token0 (2 + 0.0625)/2, token1 0.25
    expected_b2 = ((2.0 + 0.0625) / 2 + 0.25 + 0.0) / 3
    assert masked_prediction_loss(pred, target, masked, beta=2.0).item() == pytest.approx(expected_b2, abs=1e-12)


def test_masked_prediction_ignores_visible_and_zero_for_equal():
    pred, target = _rand(2, 6, 4, seed=120), _rand(2, 6, 4, seed=121)
    masked = ~_rand_visible(2, 6, seed=122)
    masked[:, 1] = True
    base = masked_prediction_loss(pred, target, masked)
    assert base > 0
    p2, t2 = pred.clone(), target.clone()
    p2[~masked] = float("nan")
    t2[~masked] = 1e6
    assert masked_prediction_loss(p2, t2, masked) == base
    p3 = pred.clone()
    p3[0, 1] += 1.0
    assert masked_prediction_loss(p3, target, masked) != base
    assert masked_prediction_loss(target.clone(), target, masked) == 0


def test_masked_prediction_normalize_target():
    pred, target = _rand(2, 6, 8, seed=130), _rand(2, 6, 8, seed=131)
    masked = torch.ones(2, 6, dtype=torch.bool)
    a = masked_prediction_loss(pred, target, masked, normalize_target=True)
    b = masked_prediction_loss(pred, 3.0 * target + 5.0, masked, normalize_target=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)  # eps=1e-6 in LayerNorm: near-exact only
    assert masked_prediction_loss(pred, 3.0 * target + 5.0, masked) != masked_prediction_loss(pred, target, masked)
    norm_t = F.layer_norm(target, (8,), eps=1e-6)
    torch.testing.assert_close(a, masked_prediction_loss(pred, norm_t, masked))
    assert masked_prediction_loss(norm_t, target, masked, normalize_target=True).abs() < 1e-12


def test_masked_prediction_no_masked_tokens_and_grad():
    pred = _rand(2, 4, 3, seed=140, requires_grad=True)
    target = _rand(2, 4, 3, seed=141)
    loss = masked_prediction_loss(pred, target, torch.zeros(2, 4, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    masked = torch.tensor([[True, False, False, True], [False, False, True, False]])
    target_copy = target.clone()
    masked_prediction_loss(pred, target, masked).backward()
    assert torch.equal(target, target_copy)
    assert (pred.grad[~masked] == 0).all() and (pred.grad[masked] != 0).any()


def test_masked_prediction_bad_inputs():
    pred, target = _rand(2, 4, 3), _rand(2, 4, 3)
    masked = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="shapes differ"):
        masked_prediction_loss(pred, target[:, :3], masked)
    with pytest.raises(ValueError, match="bool"):
        masked_prediction_loss(pred, target, masked.long())
    with pytest.raises(ValueError, match="shape"):
        masked_prediction_loss(pred, target, masked[:, :3])
    with pytest.raises(ValueError, match="None"):
        masked_prediction_loss(pred, target, None)
    with pytest.raises(ValueError, match="beta"):
        masked_prediction_loss(pred, target, masked, beta=-1.0)
    with pytest.raises(ValueError, match="pred"):
        masked_prediction_loss(pred[0], target[0], masked)


# ---------------------------------------------------------------- logit KD


def _manual_kd(s, t, temp):
    total = 0.0
    for srow, trow in zip(s.tolist(), t.tolist()):
        zs = sum(math.exp(v / temp) for v in srow)
        zt = sum(math.exp(v / temp) for v in trow)
        for a, b in zip(srow, trow):
            p, q = math.exp(b / temp) / zt, math.exp(a / temp) / zs
            total += p * math.log(p / q)
    return total / len(s) * temp**2


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_logit_kd(temp):
    s, t = _rand(4, 7, seed=150), _rand(4, 7, seed=151)
    assert logit_kd_loss(s, t, temp).item() == pytest.approx(_manual_kd(s, t, temp), rel=1e-10)
    assert logit_kd_loss(s, t, temp) > 0
    assert logit_kd_loss(t.clone(), t, temp).abs() < 1e-12
    assert logit_kd_loss(t + 3.0, t, temp).abs() < 1e-12  # softmax shift invariance


def test_logit_kd_grad_and_bad_inputs():
    s = _rand(3, 5, seed=160, requires_grad=True)
    t = _rand(3, 5, seed=161)
    logit_kd_loss(s, t, 2.0).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="shapes differ"):
        logit_kd_loss(s, t[:, :4])
    with pytest.raises(ValueError, match="temperature"):
        logit_kd_loss(s, t, 0.0)


def test_logit_kd_with_classes_the_teacher_rules_out():
    # A teacher logit of -inf (a class masked out) has probability 0: it contributes nothing, as if absent.
    s = _rand(3, 5, seed=162, requires_grad=True)
    t = _rand(3, 5, seed=163)
    t[:, 1] = float("-inf")
    loss = logit_kd_loss(s, t, 2.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    keep = [0, 2, 3, 4]
    # Without the class the student's softmax renormalises, so compare with the closed form directly.
    p = torch.softmax(t / 2.0, -1)[:, keep]
    log_q = torch.log_softmax(s.detach() / 2.0, -1)[:, keep]
    expected = (p * (p.log() - log_q)).sum(-1).mean() * 4.0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)


def _saved_numel(fn):
    """Distinct storage (in elements) autograd saves for backward while running fn."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()  # views of one tensor share a storage: count it once
        storages[st.data_ptr()] = st.nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_row_blocks_bound_saved_memory():
    l = 256
    s = _rand(1, l, 8, seed=170, requires_grad=True)
    t = _rand(1, l, 8, seed=171)
    full, n_full = _saved_numel(lambda: activation_matching_loss(s, t))
    blk, n_blk = _saved_numel(lambda: activation_matching_loss(s, t, row_block_size=16))
    assert n_full >= l * l  # the full path keeps (L x L) maps for backward
    assert n_blk < l * l // 4  # the blocked path keeps only O(L * C + block * L)
    g_full, = torch.autograd.grad(full, s)
    g_blk, = torch.autograd.grad(blk, s)
    torch.testing.assert_close(g_blk, g_full)
