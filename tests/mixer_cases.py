"""Small mixer configurations shared by the mixer tests: id -> (mixer name, kwargs at width 32)."""
MIXER_CASES = {
    "mamba2": ("mamba2", dict(d_state=16, head_dim=16)),
    "mamba2-noconv": ("mamba2", dict(d_state=16, head_dim=16, d_conv=1)),  # width 1: a per-channel scale
    "gla": ("gla", dict(num_heads=2)),  # with its default short conv
    "gla-noconv": ("gla", dict(num_heads=2, conv_size=0)),
    "hgrn": ("hgrn", dict(conv_size=3)),
    "hgrn-noconv": ("hgrn", dict(conv_size=0)),
}
