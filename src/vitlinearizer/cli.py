"""Command line: ``vitlinearizer train-teacher | distill | finetune | eval | predict | plot | demo | bench``.

Training commands read a YAML file (``--config``, see ``configs/``) and accept every key as an override,
``--section.key VALUE`` (each command's ``--help`` lists the keys it reads, with their defaults).
"""
from __future__ import annotations

import argparse
import collections.abc
import difflib
import functools
import json
import sys
import typing
import warnings
from pathlib import Path

import yaml

from . import config as C
from .checkpoint import CheckpointError, check_output_dir, check_writable
from .data import DataWarning
from .engine import TrainingDivergedError

TRAINING_COMMANDS = {
    "train-teacher": "train a timm ViT teacher from scratch with labels (the demo's teacher)",
    "distill": "distil the teacher into a linear-time student (activation matching + masked prediction)",
    "finetune": "fine-tune a (distilled) student with labels; without student.checkpoint: train from scratch",
}

# Options a command never reads (a key, or a section ending in "."). They are still accepted, so that one list of
# options can serve every stage, but left out of --help and named in a note when given on the command line: a
# user passing `train-teacher --teacher.weights vit.pth` would otherwise get a teacher trained from scratch
# without a word.
NOT_READ = {
    "train-teacher": ("student.", "distill.", "teacher.weights", "teacher.ignore_head", "teacher.prefer_ema",
                      "finetune.kd_weight", "finetune.kd_temperature"),
    "distill": ("finetune.",),
    "finetune": ("distill.",),
    "eval": ("data.augment", "data.auto_augment", "data.re_prob"),  # eval always uses the eval transform
}
# eval takes these from the exported model's metadata unless they are set (evaluation._PREPROCESSING)...
EVAL_FROM_MODEL = ("img_size", "mean", "std", "interpolation", "crop_pct")
# ...and, for --split holdout, these from the training run's record.
EVAL_FROM_RUN = ("holdout_fraction", "seed")


def _not_read(command: str, key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in NOT_READ.get(command, ()))


_SEQUENCES = (tuple, list, collections.abc.Sequence)


def _type_name(hint, key: str = "") -> str:
    if key == "data.img_size":
        return "SIZE"  # S, HxW or [H, W]; its annotation is Any
    if typing.get_origin(hint) in _SEQUENCES or hint in (tuple, list):
        return "LIST"  # e.g. train.betas: "0.9,0.999" or "[0.9, 0.999]"
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    hint = args[0] if args else hint
    return _type_name(hint) if typing.get_origin(hint) in _SEQUENCES else getattr(hint, "__name__", str(hint)).upper()


def _default_for(key: str, command: str | None) -> str:
    if key == "output_dir" and command is not None:
        return repr(f"runs/{command}")  # what resolve_config sets when neither the YAML nor a flag does
    if command == "eval" and key.startswith("data."):
        if key[len("data."):] in EVAL_FROM_MODEL:
            return "the model's, from its file"
        if key[len("data."):] in ("name", "root"):
            return "the data the model was trained on, from its file"
        if key[len("data."):] in EVAL_FROM_RUN:
            return f"{_default_of(key)!r}; with --split holdout, the training run's"
    return repr(_default_of(key))


def _default_of(key: str):
    cfg = C.RunConfig()
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def add_config_flags(parser: argparse.ArgumentParser, prefixes: tuple[str, ...] | None = None,
                     command: str | None = None, skip: tuple[str, ...] = ()) -> None:
    """One ``--section.key`` flag per config field (``skip``: keys the command does not take at all; those in
    NOT_READ are taken but not shown); only flags given on the command line override the YAML."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, hint in C.all_keys().items():
        section = key.split(".")[0] if "." in key else "run"
        if (prefixes is not None and section not in prefixes) or key in skip:
            continue
        # --output-dir too: the spelling of demo and bench, which a user will type here as well.
        spellings = [f"--{key}"] + (["--output-dir"] if key == "output_dir" else [])
        if _not_read(command, key):
            parser.add_argument(*spellings, dest=f"cfg:{key}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            continue
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section} options")
        groups[section].add_argument(
            *spellings, dest=f"cfg:{key}", default=argparse.SUPPRESS, metavar=_type_name(hint, key),
            help=f"{C.HELP.get(key, '')} (default: {_default_for(key, command)})",
        )


def _note_unread_flags(args: argparse.Namespace, command: str, cfg: C.RunConfig | None = None) -> None:
    """A note naming the flags given on the command line that this command will not read (see NOT_READ)."""
    given = list(overrides_from(args))
    notes = [([k for k in given if _not_read(command, k)], "{command} does not read {it}")]
    if command == "finetune" and cfg is not None and cfg.finetune.kd_weight == 0:
        notes.append(([k for k in given if k.startswith("teacher.")],
                      "finetune reads teacher.* only with finetune.kd_weight > 0"))
    for unread, why in notes:
        if unread:
            why = why.format(command=command, it="it" if len(unread) == 1 else "them")
            print(f"vitlinearizer {command}: note: ignoring {', '.join('--' + k for k in unread)} ({why})",
                  file=sys.stderr)


def overrides_from(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}


def _yaml_values(args: argparse.Namespace) -> dict:
    return C.load_yaml(args.config) if getattr(args, "config", None) else {}


def resolve_config(args: argparse.Namespace, command: str, base: dict | None = None) -> C.RunConfig:
    """``base``: the ``--config`` file's values when the caller has them already (None: read the file)."""
    values = C.merge(_yaml_values(args) if base is None else base, overrides_from(args))
    values.setdefault("output_dir", f"runs/{command}")
    return C.build_config(values)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one: not for required options, nor None (whose help says what it
    means)."""

    def _get_help_string(self, action):
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vitlinearizer",
        description="Distil a ViT into a linear-time recurrent student, fine-tune, evaluate and benchmark it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = _HelpFormatter
    for name, text in TRAINING_COMMANDS.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", metavar="FILE", help="YAML config (sections: data, train, student, teacher, "
                                                          "distill, finetune); flags override it")
        p.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in output_dir")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument("--dry-run", action="store_true",
                       help="run the configured models at their true sizes on 2 synthetic images for 2 steps "
                            "(random weights, no checkpoints, so no --resume; writes to OUTPUT_DIR-dry-run): "
                            "checks a config without its data")
        add_config_flags(p, command=name)

    p = sub.add_parser("eval", help="top-1/top-5 of an exported model on a dataset split", formatter_class=fmt)
    p.add_argument("--checkpoint", metavar="FILE", required=True, help="exported model (.safetensors)")
    p.add_argument("--split", default="test", choices=["test", "holdout", "train"], help="dataset split")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="evaluation batch size")
    p.add_argument("--amp", choices=["none", "bf16"], default="none",
                   help="bf16: forward under bfloat16 autocast (fast on GPUs; slow on CPUs without bf16 units)")
    p.add_argument("--config", metavar="FILE", help="YAML config whose data section is used")
    add_config_flags(p, prefixes=("run", "data"), command="eval", skip=("output_dir",))

    p = sub.add_parser("predict", help="top-k labels for image files", formatter_class=fmt)
    p.add_argument("--checkpoint", metavar="FILE", required=True, help="exported model (.safetensors)")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, or directories (the images below them, recursively)")
    p.add_argument("--topk", type=_positive_int, default=5, help="labels per image (at most the class count)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--img-size", metavar="SIZE", default=None,
                   help="resize to S or HxW (a multiple of the patch size; default: the training resolution)")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="images per forward pass")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser("plot", help="training curves of runs (their metrics.jsonl) as a figure", formatter_class=fmt,
                       description="Loss, the objective's terms, accuracy and learning rate against the step, for one "
                                   "run or several (compared in one figure); runs still training are drawn so far.")
    # "*", not "+": a missing run gets plot's own error, which names the usual cause (--labels before the runs).
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="output_dir of train-teacher, distill or finetune runs")
    p.add_argument("-o", "--output", metavar="FILE", default=None,
                   help=".png, .pdf or .svg to write (default: RUN_DIR/curves.png for one run, curves.png here for "
                        "several)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", default=None,
                   help="one name per run for the legend, after the run directories (default: the shortest "
                        "distinct end of each directory)")

    from .demo import add_demo_arguments
    add_demo_arguments(sub.add_parser("demo", help="the whole pipeline on Fashion-MNIST, with a report",
                                      formatter_class=fmt))
    from .bench import add_bench_arguments
    add_bench_arguments(sub.add_parser("bench", help="speed and memory vs resolution, student vs teacher",
                                       formatter_class=fmt))
    return parser


def main(argv: list[str] | None = None) -> int:
    from .data import show_data_warnings_plainly

    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}{_flag_hints(parser, args.command, unknown)}")
    show_data_warnings_plainly()
    _show_library_warnings_plainly(args.command)
    try:
        return _dispatch(args)
    except (C.ConfigError, ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"vitlinearizer {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except yaml.YAMLError as exc:
        print(f"vitlinearizer {args.command}: error: {_yaml_problem(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's, not the input's (a full disk, a storage error): 1, without a traceback
        print(f"vitlinearizer {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except TrainingDivergedError as exc:  # the run failed, not its input: 1, as for any other failure
        print(f"vitlinearizer {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"vitlinearizer {args.command}: {exc or 'interrupted'}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)


_WARNING_PREFIX = ["vitlinearizer"]
_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def _show_library_warnings_plainly(command: str) -> None:
    """Print this library's UserWarnings as one line, ``vitlinearizer COMMAND: warning: ...``: they speak to the
    user (a distilled student's untrained head, a resume that found no checkpoint), and the default format's
    "cli.py:218: UserWarning" plus a source line reads like a crash in the library. Other warnings keep theirs."""
    _WARNING_PREFIX[0] = f"vitlinearizer {command}"
    previous = warnings.formatwarning
    if getattr(previous, "_plain_library_warnings", False):
        return

    def formatwarning(message, category, filename, lineno, line=None) -> str:
        if issubclass(category, UserWarning) and not issubclass(category, DataWarning) \
                and str(filename).startswith(_PACKAGE_DIR):
            return f"{_WARNING_PREFIX[0]}: warning: {message}\n"
        return previous(message, category, filename, lineno, line)

    formatwarning._plain_library_warnings = True
    formatwarning._plain_data_warnings = getattr(previous, "_plain_data_warnings", False)  # it delegates those
    warnings.formatwarning = formatwarning


def _flag_hints(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> str:
    """'; did you mean ...' for flags given in the wrong section (--data.num_workers for --train.num_workers)
    or misspelt, among the flags ``command`` takes."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    flags = [f for f in subparsers.choices[command]._option_string_actions if f.startswith("--")]
    hints = []
    for token in unknown:
        if not token.startswith("--"):
            continue
        name = token.split("=")[0]
        same_key = [f for f in flags if "." in name and f.rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]]
        close = same_key or difflib.get_close_matches(name, flags, n=2, cutoff=0.75)
        if close:
            hints.append(f"{name}: did you mean {' or '.join(close)}?")
    return f" ({'; '.join(hints)})" if hints else ""


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line naming the file (or command-line value), the position and what YAML did not understand."""
    mark = getattr(exc, "problem_mark", None)
    source = getattr(mark, "name", None) or ""
    source = "a command-line value" if not source or source.startswith("<") else source  # "<unicode string>"
    where = f"{source}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else source
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"invalid YAML in {where}: {problem}; check the quotes, brackets and the space after each colon"


def _explicit_keys(args: argparse.Namespace, base: dict) -> set[str]:
    """The flattened config keys (``data.img_size``, ``student.model``, ...) the user set, in the ``--config`` file
    (``base``: its values) or as flags: these are kept where a checkpoint's own record would otherwise fill them."""
    from .runner import flatten_config
    return set(flatten_config(base)) | set(overrides_from(args))


def _explicit_data_keys(args: argparse.Namespace, base: dict) -> set[str]:
    """data.* fields the user set: eval keeps these instead of the export's own."""
    return {k[len("data."):] for k in _explicit_keys(args, base) if k.startswith("data.")}


def _dispatch(args: argparse.Namespace) -> int:
    from . import evaluation, runner

    if args.command in TRAINING_COMMANDS:
        base = _yaml_values(args)
        cfg = resolve_config(args, args.command, base)
        _note_unread_flags(args, args.command, cfg)
        explicit = _explicit_keys(args, base)
        if args.command != "train-teacher":
            # The architectures student.checkpoint and teacher.weights record, as the run (and its config.yaml) will
            # have them: what --print-config shows and what --dry-run builds, which would otherwise be the defaults.
            cfg = runner.resolve_architectures(cfg, explicit,
                                               teacher=args.command == "distill" or cfg.finetune.kd_weight > 0)
        if args.print_config:
            print(C.dump_yaml(cfg), end="")
            return 0
        runner.resolve_device(cfg.device)  # an unknown device fails now, not after the data and models are built
        run_dir = cfg.output_dir.rstrip("/") + "-dry-run" if args.dry_run else cfg.output_dir
        check_output_dir(run_dir, "--output_dir")
        check_writable(run_dir, "--output_dir")  # else a PermissionError traceback once the data and models are built
        if args.dry_run:
            warnings.filterwarnings("ignore", message="teacher.weights is not set")
            cfg = runner.dry_run_config(cfg, run_dir)
        stage = {"train-teacher": runner.train_teacher, "distill": functools.partial(runner.distill, explicit=explicit),
                 "finetune": functools.partial(runner.finetune, explicit=explicit)}
        summary = stage[args.command](cfg, resume=args.resume and not args.dry_run)
        if summary and "exported" in summary:  # the exporting process (rank 0 under torchrun) reports for all
            # last_eval: the holdout metrics, the only measurement of a run without a final test
            shown = {k: summary[k] for k in ("exported", "test", "last_eval", "curves", "steps")
                     if summary.get(k) is not None}
            print(json.dumps(shown, indent=2, default=str))
        return 0
    if args.command == "eval":
        base = _yaml_values(args)  # read once: the config and the keys it sets come from the same file contents
        cfg = resolve_config(args, "eval", base)
        _note_unread_flags(args, "eval")
        print(json.dumps(evaluation.evaluate(args.checkpoint, cfg.data, args.split, args.batch_size, cfg.device,
                                         explicit=_explicit_data_keys(args, base), amp=args.amp), indent=2))
        return 0
    if args.command == "predict":
        from .data import parse_size
        try:
            img_size = None if args.img_size is None else parse_size(args.img_size)
        except ValueError as exc:
            raise ValueError(f"--img-size {args.img_size}: {exc}") from None
        runner.resolve_device(args.device)

        def show(r):  # as each image is done: a long list shows progress, and a later failure loses nothing
            if "error" in r:
                print(f"vitlinearizer predict: {r['image']}: {r['error']}", file=sys.stderr, flush=True)
            elif not args.json:
                print(f"{r['image']}: " + ", ".join(f"{t['label']} {t['prob']:.3f}" for t in r["top"]), flush=True)

        results = evaluation.predict(args.checkpoint, args.images, args.topk, args.device, img_size, on_result=show,
                                     batch_size=args.batch_size)
        if args.json:
            print(json.dumps(results, indent=2, ensure_ascii=False))  # class names as the folders spell them
        failed = sum("error" in r for r in results)
        if failed:
            print(f"vitlinearizer predict: {failed} of {len(results)} image(s) could not be read", file=sys.stderr)
        return 1 if failed else 0
    if args.command == "plot":
        from .curves import plot_curves, read_metrics
        if not args.runs:
            hint = (f": --labels took every word after it ({' '.join(args.labels)}); put it after the run directories, "
                    "e.g. vitlinearizer plot RUN_A RUN_B --labels A B") if args.labels else ""
            raise ValueError(f"name at least one run directory{hint}")
        runs = [read_metrics(run) for run in args.runs]  # a wrong run directory is named before the output path
        output = Path(args.output or (Path(args.runs[0]) / "curves.png" if len(args.runs) == 1 else "curves.png"))
        print(plot_curves(runs, output, args.labels))
        return 0
    if args.command == "demo":
        from .demo import run_demo_from_args
        return run_demo_from_args(args)
    if args.command == "bench":
        from .bench import run_bench_from_args
        return run_bench_from_args(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
