"""``python -m vitlinearizer.bench [flags]``: the same as ``vitlinearizer bench [flags]``."""
import argparse
import sys

from . import add_bench_arguments, run_bench_from_args

parser = argparse.ArgumentParser(prog="python -m vitlinearizer.bench")
add_bench_arguments(parser)
try:
    sys.exit(run_bench_from_args(parser.parse_args()))
except ValueError as exc:  # a bad value: the message and exit status 2, as `vitlinearizer bench` gives
    parser.error(str(exc))
