"""Measurements behind the student's implementation choices (docs/performance.md, "Student speed work").

1. Streaming slab size of the Adventurer block (``AdventurerBlock.stream_slab_tokens``, 0 = parallel form),
   against the ViT-S block, at 1024² (and 2048² with ``--large``): 2-block models, repetitions alternating.
2. Causal depthwise conv over tokens: shifted multiply-adds in token-major layout vs ``nn.Conv1d`` (which
   needs the (B, C, L) layout: two transposing copies).
3. Patch embedding: one GEMM over unfolded patches vs timm's stride-16 ``Conv2d`` (same weights).

    .venv/bin/python benchmarks/block_parts.py [--threads 2] [--repeats 7] [--large]
"""
from __future__ import annotations

import argparse
import json
import os

# The bench's short-spin OpenMP policy (vitlinearizer.bench.openmp), set before torch loads OpenMP.
os.environ.setdefault("GOMP_SPINCOUNT", "5000")
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import vitlinearizer  # noqa: E402,F401
from vitlinearizer.bench import check_script_target, non_negative_int, positive_int  # noqa: E402
from vitlinearizer.bench.timing import alternating_times, summarize  # noqa: E402
from vitlinearizer.models.mixers import causal_depthwise_conv  # noqa: E402


def alternate(fns: dict, repeats: int) -> dict:
    return {name: dict(min_ms=r["min_s"] * 1e3, median_ms=r["median_s"] * 1e3, n=r["n"])
            for name, r in summarize(alternating_times(fns, repeats)).items()}


def slabs(size: int, repeats: int, slab_sizes) -> dict:
    student = timm.create_model("adventurer_small_patch16_224", depth=2, num_classes=0).eval()
    teacher = timm.create_model("vit_small_patch16_224", depth=2, num_classes=0, dynamic_img_size=True).eval()
    x = torch.randn(1, 3, size, size)

    def run_student(slab):
        for block in student.blocks:
            block.stream_slab_tokens = slab
        return student(x)

    fns = {f"student slab {s}" if s else "student parallel": (lambda s=s: run_student(s)) for s in slab_sizes}
    fns["vit-s"] = lambda: teacher(x)
    return alternate(fns, repeats)


def conv(repeats: int) -> dict:
    out = {}
    for length in (2112, 4099):
        proj = torch.randn(1, length, 2192)
        xbc = proj[..., 1024:2176]  # Mamba-2's xBC slice of the in_proj output (token-major, strided)
        layer = nn.Conv1d(1152, 1152, 4, groups=1152, padding=3)
        w, b = layer.weight[:, 0].detach(), layer.bias.detach()
        res = alternate({
            "taps (token-major)": lambda: torch.nn.functional.silu(causal_depthwise_conv(xbc, w, b)),
            "nn.Conv1d": lambda: torch.nn.functional.silu(layer(xbc.transpose(1, 2))[..., :length].transpose(1, 2)),
        }, repeats)
        out[str(length)] = res
    return out


def patch_embed(repeats: int) -> dict:
    model = timm.create_model("adventurer_small_patch16_224", depth=1).eval()
    x = torch.randn(1, 3, 1024, 1024)
    return alternate({"GEMM (_patchify)": lambda: model._patchify(x), "Conv2d (timm PatchEmbed)": lambda: model.patch_embed(x)},
                     repeats)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=non_negative_int, default=2, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--slabs", nargs="+", type=non_negative_int, default=[0, 1024, 2048, 4096],
                        help="stream_slab_tokens values to time (0: the parallel form)")
    parser.add_argument("--large", action="store_true", help="also 2048² (minutes)")
    parser.add_argument("--output-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    # Minutes of measuring come before the only write.
    check_script_target(parser, out, "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = dict(meta=dict(threads=torch.get_num_threads(), torch=torch.__version__, created=time.strftime("%Y-%m-%d %H:%M:%S")))
    results["conv"] = conv(args.repeats * 3)
    results["patch_embed"] = patch_embed(args.repeats * 2)
    results["slabs_1024"] = slabs(1024, args.repeats, args.slabs)
    if args.large:
        results["slabs_2048"] = slabs(2048, max(2, args.repeats // 3), args.slabs)
    lines = [f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}; min (median) ms over alternating repetitions.", ""]
    for key, res in results.items():
        if key == "meta":
            continue
        groups = res.items() if key == "conv" else [("", res)]
        for sub, r in groups:
            lines.append(f"**{key}{' L=' + sub if sub else ''}**: " + "; ".join(
                f"{name} {v['min_ms']:.1f} ({v['median_ms']:.1f})" for name, v in r.items()))
            lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    (out / "block_parts_cpu.json").write_text(json.dumps(results, indent=1))
    (out / "block_parts_cpu.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
