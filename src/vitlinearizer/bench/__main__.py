"""``python -m vitlinearizer.bench [flags]``: the same as ``vitlinearizer bench [flags]``."""
import argparse
import sys

from . import add_bench_arguments, run_bench_from_args

parser = argparse.ArgumentParser(prog="python -m vitlinearizer.bench")
add_bench_arguments(parser)
sys.exit(run_bench_from_args(parser.parse_args()))
