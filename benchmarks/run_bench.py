"""The benchmark runner as a script: ``python benchmarks/run_bench.py ARGS`` == ``mixsd-edit bench ARGS``.

    python benchmarks/run_bench.py --methods MixSD,ROME,MEMIT,FT-M,SFT \
        --data ../shared/data/counterfact_easyedit/counterfact-edit-1k.json --n 100 --mode batch \
        --retention --out results/bench/cf-batch-100
    python benchmarks/run_bench.py --help
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mixsd_edit.cli import bench_main as main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
