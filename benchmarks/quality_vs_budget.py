"""Quality vs KV cache budget on the bundled digits model: prints the markdown table.

    .venv/bin/python benchmarks/quality_vs_budget.py --samples 1000 --out benchmarks/results/quality

A thin wrapper over `lineray eval` (lineray.quality.runner); the same options apply.
"""
import argparse

from lineray.quality import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))
