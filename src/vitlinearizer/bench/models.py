"""The student/teacher pairs of ``vitlinearizer bench``: how each model is built, its token count and FLOPs."""
from __future__ import annotations

# Pairs: student and teacher of equal depth (and width except "small"), built with pretrained=False.
PAIRS: dict[str, dict] = {
    "small": dict(student=("adventurer_small_patch16_224", {}),
                  teacher=("vit_small_patch16_224", {}),
                  note="small: Adventurer-S (512 wide) vs ViT-S (384 wide), depth 12"),
    # Adventurer-S cut to ViT-S's width: the like-for-like comparison at equal width and depth. Its label keeps
    # it apart from the 512-wide model of "small" (same timm name) in the slopes, the plot and the rate book.
    "small384": dict(student=("adventurer_small_patch16_224", dict(embed_dim=384)),
                     teacher=("vit_small_patch16_224", {}),
                     labels=dict(student="adventurer_small_patch16_224 (384 wide)"),
                     note="small384: Adventurer-S built 384 wide vs ViT-S (384 wide), depth 12: equal width "
                          "and depth"),
    "base": dict(student=("adventurer_base_patch16_224", {}),
                 teacher=("vit_base_patch16_224", {})),
    # The demo pair of `vitlinearizer demo`: width 192, depth 6, patch 4 (a ViT-Tiny cut to 6 blocks).
    "demo": dict(student=("adventurer_micro_patch4_28", {}),
                 teacher=("vit_tiny_patch16_224", dict(patch_size=4, embed_dim=192, depth=6, num_heads=3,
                                                       img_size=28, num_classes=10))),
}


def model_spec(pair: str, role: str) -> tuple[str, dict]:
    name, kwargs = PAIRS[pair][role]
    kwargs = dict(kwargs)
    if role == "teacher":
        kwargs["dynamic_img_size"] = True  # any resolution; timm's fused SDPA stays on (its default)
    return name, kwargs


def model_label(pair: str, role: str) -> str:
    """The model's name in the outputs: its timm name unless the pair gives it a label."""
    return PAIRS[pair].get("labels", {}).get(role) or PAIRS[pair][role][0]


def build_model(pair: str, role: str, device="cpu", dtype=None):
    import timm
    import torch

    import vitlinearizer  # noqa: F401  (registers the students)

    name, kwargs = model_spec(pair, role)
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    return model.to(device=device, dtype=dtype if dtype is not None else torch.float32)


def token_patch(pair: str, role: str) -> int:
    name, kwargs = model_spec(pair, role)
    return kwargs.get("patch_size") or int(name.split("patch")[1].split("_")[0])


def token_count(pair: str, role: str, size: tuple[int, int]) -> int:
    patch = token_patch(pair, role)
    return (size[0] // patch) * (size[1] // patch) + 1


def _flop_formulas() -> dict:
    """FLOP formulas for ops FlopCounterMode does not know: the CPU flash-attention kernel and the in-place
    ``baddbmm_`` / ``addmm_``, which count as 0 otherwise (the chunked kernel adds its inter-chunk product
    ``q @ state`` with ``baddbmm_`` when autograd is off: ~2-3% of the student's FLOPs)."""
    import torch
    from torch.utils.flop_counter import sdpa_flop_count

    def cpu_flash(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def addmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    def baddbmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]

    ops = {torch.ops.aten.baddbmm_: baddbmm_inplace, torch.ops.aten.addmm_: addmm_inplace}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        ops[op] = cpu_flash
    return ops


def count_flops(fn, *inputs) -> tuple[int, dict[str, int]]:
    """FLOPs of ``fn(*inputs)`` with FlopCounterMode: (total, {op name: flops})."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_flop_formulas()) as counter, torch.no_grad():
        fn(*inputs)
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def model_flops(pair: str, role: str, size: tuple[int, int], batch: int = 1) -> tuple[int, dict[str, int]]:
    """FLOPs of one inference forward, counted on the meta device (shapes only: fast at any size)."""
    import torch

    with torch.device("meta"):
        model = build_model(pair, role, device="meta")
        x = torch.empty(batch, 3, size[0], size[1])
    return count_flops(model, x)
