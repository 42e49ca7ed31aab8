"""Quality vs KV cache budget on a bundled model: prints the markdown table.

    .venv/bin/python benchmarks/quality_vs_budget.py --samples 1000 --out benchmarks/results/quality
    .venv/bin/python benchmarks/quality_vs_budget.py --model shapes-24 --samples 1000 --out benchmarks/results/quality_shapes24

A thin wrapper over `lineray eval` (lineray.quality.runner); the same options apply.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from lineray.quality import add_arguments, run  # noqa: E402

if __name__ == "__main__":
    print(f"machine: {machine()}")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
