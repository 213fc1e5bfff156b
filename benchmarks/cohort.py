"""Cohort throughput: subjects per hour and peak memory per worker, for 1 and 2 local Dask workers.

Pseudo-subjects of the 2 mm MNI brain, the `alzheimers` scenario (its atlas: pip install 'brainmech[atlas]'),
years 1, 3, 5, every file of the BIDS layout written. Run by hand (the README quotes it):

    python benchmarks/cohort.py [--subjects 4] [--method network] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from brainmech.cohort import Cohort, mni_pseudo_subjects
from brainmech.scenarios import Scenario


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--method", default="network")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print("| workers | subjects | wall (s) | subjects per hour | task per subject (s) | peak memory per worker (MB) |")
    print("|---|---|---|---|---|---|")
    for workers in args.workers:
        with tempfile.TemporaryDirectory() as folder:
            cohort = Cohort(mni_pseudo_subjects(args.subjects), Scenario.load("alzheimers"), years=[1, 3, 5],
                            out=Path(folder) / "dataset", method=args.method)
            start = time.perf_counter()
            result = cohort.run(workers=workers)  # includes starting the local cluster and its workers
            wall = time.perf_counter() - start
        assert not result.failed, result.failed
        task = sum(o.seconds for o in result.outcomes) / len(result.outcomes)
        memory = max(o.peak_memory_mb for o in result.outcomes)
        print(f"| {workers} | {args.subjects} | {wall:.0f} | {args.subjects / wall * 3600:.0f} | {task:.1f} | {memory:.0f} |",
              flush=True)


if __name__ == "__main__":  # Dask's local workers are spawned processes: they must not rerun this
    main()
