"""Causal token mixers built on the shared linear recurrence (:mod:`vitlinearizer.ops`).

- :class:`Mamba2Mixer`: Mamba-2 (SSD), scalar decay per head (arXiv 2405.21060);
- :class:`GLAMixer`: gated linear attention, decay per key channel (arXiv 2312.06635);
- :class:`HGRNMixer`: HGRN, an element-wise gated RNN (arXiv 2311.04823), the diagonal case.

All three start with a short causal depthwise conv of width 4 (:class:`ShortConv`): Mamba-2's own ``conv1d``,
and fla's ``use_short_conv`` for GLA and HGRN (``conv_size=0`` removes it there).

Every mixer maps (B, L, D) -> (B, L, D) with ``forward`` (parallel, for training), has a recurrent
``step(x_t, state) -> (y_t, state)`` for O(1)-memory inference, and ``scan(x, state) -> (y, state)`` which
runs a whole segment from a carried state (``step``'s state format), so a long sequence can be processed
slab by slab with a small working set; all three agree (tests/test_mixers.py).

Without autograd (``torch.no_grad`` / ``torch.inference_mode``) the mixers update their own temporaries in
place: on CPU a fresh multi-MB tensor costs more in page faults than the arithmetic done on it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import linear_recurrence, recurrent_step


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Decays and gates are computed in float32 under bf16/fp16 autocast (exp of low-precision sums drifts)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _inplace_ok() -> bool:
    """True when autograd is off, so temporaries may be overwritten."""
    return not torch.is_grad_enabled()


def causal_depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          prev: torch.Tensor | None = None) -> torch.Tensor:
    """Causal depthwise conv over tokens in token-major layout, as K shifted multiply-adds.

    ``x`` (B, T, C) (any strides), ``weight`` (C, K), ``bias`` (C,), ``prev`` optional (B, K-1, C) inputs
    preceding ``x`` (zeros when None). Equals ``Conv1d(C, C, K, groups=C, padding=K-1)`` on
    ``x.transpose(1, 2)`` cut to the first T outputs, without the two layout copies a Conv1d needs
    (benchmarks/block_parts.py measures both).
    """
    width = weight.shape[1]
    length = x.shape[1]
    taps = weight.t().contiguous()  # (K, C): a strided weight column would take a slow broadcast path
    out = x * taps[-1] if bias is None else torch.addcmul(bias, x, taps[-1])
    for i in range(width - 1):
        shift = width - 1 - i  # tap i looks `shift` tokens back
        if shift < length:  # in-place is autograd-safe: addcmul's backward keeps no output
            out[:, shift:].addcmul_(x[:, :length - shift], taps[i])
        if prev is not None:  # the first `shift` outputs reach back into the previous segment
            rows = min(shift, length)
            out[:, :rows].addcmul_(prev[:, i:i + rows].to(x.dtype), taps[i])
    return out


# torch.fx records these as calls instead of tracing them: they branch on the sequence length and the dtype
# (the recurrence also on its values), which a traced graph only knows at run time.
torch.fx.wrap("_at_least_float32")
torch.fx.wrap("causal_depthwise_conv")
torch.fx.wrap("linear_recurrence")


class ShortConv(nn.Conv1d):
    """Causal depthwise conv of width ``width`` over tokens, then SiLU unless ``activation=False``.

    Mamba-2's ``conv1d`` (with bias) and fla's ``ShortConvolution`` (GLA, HGRN; without): it gives a mixer a
    local receptive field before its recurrence. An ``nn.Conv1d`` (same parameters and names) that runs on
    token-major (B, T, C) inputs as shifted multiply-adds; its state is the last ``width - 1`` inputs
    (B, width - 1, C).
    """

    def __init__(self, channels: int, width: int, bias: bool = False, activation: bool = True):
        if width < 1:
            raise ValueError(f"ShortConv: width must be at least 1 (got {width}); GLA and HGRN take conv_size=0 "
                             "for no conv")
        super().__init__(channels, channels, width, groups=channels, padding=width - 1, bias=bias)
        self.activation = activation

    @property
    def width(self) -> int:
        return self.kernel_size[0]

    def forward(self, x: torch.Tensor, prev: torch.Tensor | None = None, want_state: bool = False):
        """x (B, T, C), ``prev`` (B, width-1, C) or None (zeros). Returns (output, the last width-1 inputs or None)."""
        window = None
        if want_state:
            keep = self.width - 1
            before = prev if prev is not None else x.new_zeros(x.shape[0], keep, x.shape[2])
            joined = torch.cat([before.to(x.dtype), x[:, max(x.shape[1] - keep, 0):]], 1)  # only x's tail is copied
            window = joined[:, joined.shape[1] - keep:]  # not [-keep:]: keep is 0 for width 1
        y = causal_depthwise_conv(x, self.weight[:, 0], self.bias, prev)
        return (F.silu(y, inplace=_inplace_ok()) if self.activation else y), window

    def step(self, x_t: torch.Tensor, prev: torch.Tensor | None = None):
        """One token x_t (B, C) from the window ``prev`` (B, width-1, C) or None; returns (y_t, window)."""
        if prev is None:
            prev = x_t.new_zeros(x_t.shape[0], self.width - 1, x_t.shape[1])
        window = torch.cat([prev.to(x_t.dtype), x_t[:, None]], 1)  # (B, width, C), oldest first
        y = torch.einsum("bkc,ck->bc", window, self.weight[:, 0])
        y = y if self.bias is None else y + self.bias
        return (F.silu(y) if self.activation else y), window[:, 1:]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # GLA/HGRN checkpoints from before ShortConv was itself the Conv1d hold the weight one level down.
        old = prefix + "conv1d.weight"
        if old in state_dict:
            state_dict[prefix + "weight"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * SiLU(z)) over groups of channels (Mamba-2's norm_before_gate=False)."""

    def __init__(self, dim: int, group_size: int | None = None, eps: float = 1e-5):
        super().__init__()
        self.group_size = group_size or dim
        if dim % self.group_size:
            raise ValueError(f"GatedRMSNorm: dim {dim} is not a multiple of group_size {self.group_size}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor, overwrite_z: bool = False) -> torch.Tensor:
        """``overwrite_z``: z is a temporary of the caller and may be used as scratch (only without autograd)."""
        if _inplace_ok():
            gate = F.silu(z, inplace=overwrite_z)
            # In place only into a tensor of the product's dtype: under autocast z is bf16 while y comes from the
            # float32 kernel, and the autograd path multiplies in float32.
            x = (gate.mul_(y) if gate.dtype == torch.promote_types(gate.dtype, y.dtype) else gate * y).unflatten(-1, (-1, self.group_size))
            x = _at_least_float32(x)
            # ||x|| / sqrt(n) is the RMS: one reduction pass and no squared temporary.
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
            x = x.mul_(norm.square_().div_(self.group_size).add_(self.eps).rsqrt_())
            x = x.flatten(-2).to(y.dtype)
            return x.mul_(self.weight.to(x.dtype))
        x = (y * F.silu(z)).unflatten(-1, (-1, self.group_size))
        x = _at_least_float32(x)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.flatten(-2).to(y.dtype) * self.weight


# in_proj's output width is padded to a multiple of this: MKL's CPU sgemm runs 20-35% slower when the width
# is 4 mod 8, as for Adventurer at width 384 (2*768 + 2*64 + 12 heads = 1676; 1680 runs at the speed of its
# neighbours). The outputs of the padding rows are never read (so those rows get no gradient). Same idea as
# Mamba's ``pad_vocab_size_multiple`` for its output embedding. See docs/performance.md.
IN_PROJ_ALIGN = 8


class Mamba2Mixer(nn.Module):
    """Mamba-2 layer: in_proj -> (z, xBC, dt); causal depthwise conv on xBC; SSD; gated RMSNorm; out_proj.

    The SSD recurrence per head h is S_t = exp(-dt_t A_h) S_{t-1} + B_t (dt_t x_t)^T, y_t = S_t^T C_t + D_h x_t,
    i.e. ``linear_recurrence(q=C, k=B, v=x*dt, log_decay=-dt*A)`` with B and C shared by the heads of a group.
    """

    def __init__(
        self,
        dim: int,
        d_state: int = 64,
        expand: int = 2,
        d_conv: int = 4,
        head_dim: int = 64,
        n_groups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        norm_eps: float = 1e-5,
        impl: str = "auto",
        chunk_size: int | None = None,
    ):
        super().__init__()
        d_inner = expand * dim
        if d_inner % head_dim:
            raise ValueError(f"Mamba2Mixer: expand*dim = {d_inner} must be a multiple of head_dim {head_dim}")
        self.num_heads = d_inner // head_dim
        if self.num_heads % n_groups:
            raise ValueError(f"Mamba2Mixer: {self.num_heads} heads cannot be split into n_groups={n_groups}")
        self.d_inner, self.d_state, self.d_conv = d_inner, d_state, d_conv
        self.head_dim, self.n_groups = head_dim, n_groups
        self.impl, self.chunk_size = impl, chunk_size
        self.conv_dim = d_inner + 2 * n_groups * d_state

        used = d_inner + self.conv_dim + self.num_heads
        self._in_proj_split = [d_inner, self.conv_dim, self.num_heads, -used % IN_PROJ_ALIGN]
        self.in_proj = nn.Linear(dim, used + self._in_proj_split[-1], bias=False)
        self.conv1d = ShortConv(self.conv_dim, d_conv, bias=True)
        # dt is log-uniform in [dt_min, dt_max]; store softplus^-1(dt) so softplus(dt_bias) starts there.
        dt = torch.exp(torch.rand(self.num_heads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(self.num_heads).uniform_(*A_init_range).log())
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // n_groups, eps=norm_eps)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before in_proj was padded (or by unpadded Mamba-2 code) have no padding rows.
        key = prefix + "in_proj.weight"
        weight = state_dict.get(key)
        rows = self.in_proj.out_features
        if weight is not None and weight.dim() == 2 and weight.shape[0] == rows - self._in_proj_split[-1] < rows:
            state_dict[key] = torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _ssd_inputs(self, xbc: torch.Tensor, dt: torch.Tensor):
        """Split the conv output into recurrence inputs; shapes keep any leading (B,) or (B, L) dims."""
        xs, b, c = xbc.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        xs = xs.unflatten(-1, (self.num_heads, self.head_dim))  # (..., H, P)
        dt = F.softplus(_at_least_float32(dt) + self.dt_bias)  # (..., H)
        log_decay = dt * self.A_log.exp().neg()  # (..., H), <= 0
        q = c.unflatten(-1, (self.n_groups, self.d_state))  # (..., G, N)
        k = b.unflatten(-1, (self.n_groups, self.d_state))  # (..., G, N)
        v = xs * dt[..., None].to(xs.dtype)  # (..., H, P)
        return xs, q, k, v, log_decay

    def _output(self, y: torch.Tensor, xs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        d = self.D[:, None].to(xs.dtype)
        if _inplace_ok() and y.is_contiguous():
            y = y.addcmul_(xs, d)  # (..., H, P)
        else:
            y = torch.addcmul(y, xs, d)
        y = self.norm(y.flatten(-2), z, overwrite_z=True)  # z: a slice of this mixer's in_proj output
        return self.out_proj(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scan(x, want_state=False)[0]

    def scan(self, x: torch.Tensor, state=None, want_state: bool = True):
        """A segment x (B, T, D) from ``state`` (as :meth:`step`'s, or None for the sequence start).

        Returns (y (B, T, D), state after the segment), or (y, None) when ``want_state`` is False.
        """
        conv_state, ssm_state = (None, None) if state is None else state
        z, xbc, dt, _ = self.in_proj(x).split(self._in_proj_split, dim=-1)
        xbc, conv_state = self.conv1d(xbc, conv_state, want_state=want_state)
        xs, q, k, v, log_decay = self._ssd_inputs(xbc, dt)
        y = linear_recurrence(q, k, v, log_decay, initial_state=ssm_state, return_final_state=want_state,
                              impl=self.impl, chunk_size=self.chunk_size)  # (B, T, H, P)
        if want_state:
            y, ssm_state = y
        out = self._output(y, xs, z)
        return out, ((conv_state, ssm_state) if want_state else None)

    def step(self, x_t: torch.Tensor, state=None):
        """One token: x_t (B, D), state (conv window (B, d_conv-1, C), SSM state (B, H, N, P)) or None."""
        conv_state, ssm_state = (None, None) if state is None else state
        z, xbc, dt, _ = self.in_proj(x_t).split(self._in_proj_split, dim=-1)
        xbc, conv_state = self.conv1d.step(xbc, conv_state)
        xs, q, k, v, log_decay = self._ssd_inputs(xbc, dt)
        y, ssm_state = recurrent_step(q, k, v, log_decay, ssm_state, validate=False)  # built to fit, every token
        return self._output(y, xs, z), (conv_state, ssm_state)


class _ShortConvMixin:
    """For a mixer with an optional :class:`ShortConv` ``self.conv`` in front of its recurrence.

    Its state is the recurrence state alone without a conv, and the pair (conv window, recurrence state) with one.
    """

    conv: ShortConv | None

    def _split_state(self, state):
        if state is None:
            return None, None
        return state if self.conv is not None else (None, state)

    def _join_state(self, conv_state, state):
        return (conv_state, state) if self.conv is not None else state

    def _convolve(self, parts: list[torch.Tensor], conv_state, step: bool, want_state: bool):
        """The short conv over the channels of ``parts`` together (one op); returns (parts, conv window)."""
        if self.conv is None:
            return parts, conv_state
        joined = torch.cat(parts, dim=-1)
        joined, conv_state = (self.conv.step(joined, conv_state) if step
                              else self.conv(joined, conv_state, want_state=want_state))
        return joined.split([part.shape[-1] for part in parts], dim=-1), conv_state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint of the layer without its conv (written before the conv became the default, or built with
        # conv_size=0) loads as that layer. Parents load before children, so the conv is gone before its turn.
        # A state dict without this layer at all (a partial, non-strict load) leaves it alone.
        mine = [key for key in state_dict if key.startswith(prefix)]
        if self.conv is not None and mine and not any(key.startswith(prefix + "conv.") for key in mine):
            self.conv = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class GLAMixer(_ShortConvMixin, nn.Module):
    """Gated linear attention: per-key-channel data-dependent decay from a low-rank gate, gated RMSNorm output.

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T with g_t = logsigmoid(W2 W1 x_t) / gate_normalizer, y_t = S_t^T q_t.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int | None = None,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_normalizer: float = 16.0,
        conv_size: int = 4,
        norm_eps: float = 1e-5,
        impl: str = "auto",
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.key_dim, self.value_dim = int(dim * expand_k), int(dim * expand_v)
        self.num_heads = num_heads or max(1, dim // 128)
        if self.key_dim % self.num_heads or self.value_dim % self.num_heads:
            raise ValueError(
                f"GLAMixer: key dim {self.key_dim} and value dim {self.value_dim} must divide into {self.num_heads} heads"
            )
        self.head_k, self.head_v = self.key_dim // self.num_heads, self.value_dim // self.num_heads
        self.gate_normalizer, self.impl, self.chunk_size = gate_normalizer, impl, chunk_size
        self.q_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.key_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.value_dim, bias=False)
        self.g_proj = nn.Linear(dim, self.value_dim, bias=False)
        self.gk_proj = nn.Sequential(
            nn.Linear(dim, gate_low_rank_dim, bias=False), nn.Linear(gate_low_rank_dim, self.key_dim, bias=True)
        )
        self.norm = GatedRMSNorm(self.value_dim, group_size=self.head_v, eps=norm_eps)
        self.o_proj = nn.Linear(self.value_dim, dim, bias=False)
        # Short conv on q, k and v (fla's use_short_conv), one depthwise conv over the three. On by default, at
        # Mamba-2's width: without it the student has no local receptive field but the decaying scan, and on
        # Fashion-MNIST a GLA student trained from scratch loses 12 points (docs/results.md). 0: the paper's layer.
        self.conv = ShortConv(2 * self.key_dim + self.value_dim, conv_size) if conv_size else None

    def _inputs(self, x: torch.Tensor, conv_state=None, step: bool = False, want_state: bool = False):
        (q, k, v), conv_state = self._convolve([self.q_proj(x), self.k_proj(x), self.v_proj(x)], conv_state,
                                               step, want_state)
        heads = (self.num_heads, self.head_k)
        q = q.unflatten(-1, heads) * self.head_k**-0.5  # the kernel takes unscaled q
        k = k.unflatten(-1, heads)
        v = v.unflatten(-1, (self.num_heads, self.head_v))
        log_decay = F.logsigmoid(_at_least_float32(self.gk_proj(x))).unflatten(-1, heads) / self.gate_normalizer
        return q, k, v, log_decay, conv_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scan(x, want_state=False)[0]

    def scan(self, x: torch.Tensor, state=None, want_state: bool = True):
        """A segment x (B, T, D) from ``state`` (as :meth:`step`'s, or None); returns (y, state)."""
        conv_state, state = self._split_state(state)
        q, k, v, log_decay, conv_state = self._inputs(x, conv_state, want_state=want_state)
        y = linear_recurrence(q, k, v, log_decay, initial_state=state, return_final_state=want_state,
                              impl=self.impl, chunk_size=self.chunk_size)
        y, state = y if want_state else (y, None)
        out = self.o_proj(self.norm(y.flatten(-2), self.g_proj(x), overwrite_z=True))
        return out, (self._join_state(conv_state, state) if want_state else None)

    def step(self, x_t: torch.Tensor, state=None):
        """One token: x_t (B, D); state (B, H, N, P), or (conv window (B, conv_size-1, C), that) with a conv."""
        conv_state, state = self._split_state(state)
        q, k, v, log_decay, conv_state = self._inputs(x_t, conv_state, step=True)
        y, state = recurrent_step(q, k, v, log_decay, state, validate=False)
        return self.o_proj(self.norm(y.flatten(-2), self.g_proj(x_t))), self._join_state(conv_state, state)


class HGRNMixer(_ShortConvMixin, nn.Module):
    """HGRN: element-wise gated recurrence h_t = f_t * h_{t-1} + (1 - f_t) * SiLU(W_i x_t), output-gated.

    Each channel is its own head with a 1x1 state (N = P = 1), so the shared per-head-decay kernel runs it.
    """

    def __init__(self, dim: int, expand: float = 1.0, conv_size: int = 4, norm_eps: float = 1e-5,
                 impl: str = "auto", chunk_size: int | None = 16):
        super().__init__()
        self.inner = int(dim * expand)
        self.impl, self.chunk_size = impl, chunk_size
        self.i_proj = nn.Linear(dim, self.inner, bias=False)
        self.f_proj = nn.Linear(dim, self.inner, bias=True)
        self.g_proj = nn.Linear(dim, self.inner, bias=False)
        self.norm = GatedRMSNorm(self.inner, eps=norm_eps)
        self.o_proj = nn.Linear(self.inner, dim, bias=False)
        # Short conv on the input and forget-gate pre-activations (fla's HGRN use_short_conv); on by default
        # for the reason given in GLAMixer. 0: the paper's layer.
        self.conv = ShortConv(2 * self.inner, conv_size, activation=False) if conv_size else None

    def _inputs(self, x: torch.Tensor, conv_state=None, step: bool = False, want_state: bool = False):
        (i, f_logit), conv_state = self._convolve([self.i_proj(x), self.f_proj(x)], conv_state, step, want_state)
        f_logit = _at_least_float32(f_logit)
        log_forget = F.logsigmoid(f_logit)  # (..., C)
        update = F.silu(i) * torch.sigmoid(-f_logit).to(x.dtype)  # (1 - f) * i
        ones = torch.ones_like(update[..., :1]).unsqueeze(-1)  # (..., 1, 1): q = k = 1 for all channels (one group)
        return ones, ones, update[..., None], log_forget, conv_state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scan(x, want_state=False)[0]

    def scan(self, x: torch.Tensor, state=None, want_state: bool = True):
        """A segment x (B, T, D) from ``state`` (as :meth:`step`'s, or None); returns (y, state)."""
        conv_state, state = self._split_state(state)
        q, k, v, log_decay, conv_state = self._inputs(x, conv_state, want_state=want_state)
        h = linear_recurrence(q, k, v, log_decay, initial_state=state, return_final_state=want_state,
                              impl=self.impl, chunk_size=self.chunk_size)  # (B, L, C, 1)
        h, state = h if want_state else (h, None)
        out = self.o_proj(self.norm(h.squeeze(-1), self.g_proj(x), overwrite_z=True))
        return out, (self._join_state(conv_state, state) if want_state else None)

    def step(self, x_t: torch.Tensor, state=None):
        """One token: x_t (B, D); state (B, C, 1, 1), or (conv window (B, conv_size-1, 2C), that) with a conv."""
        conv_state, state = self._split_state(state)
        q, k, v, log_decay, conv_state = self._inputs(x_t, conv_state, step=True)
        h, state = recurrent_step(q, k, v, log_decay, state, validate=False)
        return self.o_proj(self.norm(h.squeeze(-1), self.g_proj(x_t))), self._join_state(conv_state, state)


MIXERS = {"mamba2": Mamba2Mixer, "gla": GLAMixer, "hgrn": HGRNMixer}


def create_mixer(name: str, dim: int, **kwargs) -> nn.Module:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; choose one of {', '.join(MIXERS)}")
    return MIXERS[name](dim, **kwargs)
