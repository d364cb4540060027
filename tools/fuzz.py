"""The long fuzz run of every file reader: the strategies of ``tests/test_fuzz_readers.py`` with a large budget.

CI runs each reader's hypothesis test with a few dozen derandomized examples; this script runs the same
strategies and the same property (`check_input`: documented exceptions only, message names the file, no hang, no
allocation the input does not justify) for thousands of random examples per reader, without stopping at the first
failure. Failures are grouped by where they came from (exception type and the innermost library frame); the
smallest input of each group is written to ``--save-dir/<reader>/<hash>.bin`` so that, once fixed, it can be
copied into ``tests/fuzz_corpus/<reader>/`` and replayed by CI forever. A JSON summary (inputs tried, seconds,
failures per reader) is printed and, with ``--report``, written to a file: those are the figures in
``docs/robustness.md``.

    python tools/fuzz.py                                  # every reader, 2000 inputs each
    python tools/fuzz.py --readers frozen_graph,coco_json --seconds 600 --seed 7
    python tools/fuzz.py --examples 20000 --report fuzz_report.json --save-dir /tmp/fuzz_failures
    python tools/fuzz.py --write-hand-made tests/fuzz_corpus   # (re)write the hand-made hostile inputs

Run it with one thread (``OMP_NUM_THREADS=1``) on shared machines: it is single-process by design.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import test_fuzz_readers as harness  # noqa: E402
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402


class _OutOfTime(Exception):
    """Raised inside the hypothesis test to end a reader's run when its time budget is spent."""


@dataclass
class Failure:
    """One group of failing inputs: same assertion kind, same exception type, same innermost library frame."""

    signature: str
    message: str
    count: int = 0
    smallest: bytes = b""


@dataclass
class ReaderRun:
    reader: str
    tried: int = 0
    seconds: float = 0.0
    outcomes: dict[str, int] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "reader": self.reader,
            "inputs_tried": self.tried,
            "seconds": round(self.seconds, 1),
            "outcomes": dict(sorted(self.outcomes.items())),
            "distinct_failures": len(self.failures),
            "failures": [
                {"signature": f.signature, "count": f.count, "smallest_input_bytes": len(f.smallest),
                 "message": f.message[:300]}
                for f in self.failures.values()
            ],
        }


def _signature(error: AssertionError) -> str:
    """Where a failure comes from: the assertion class, the original exception type, its innermost repo frame."""
    cause = error.__cause__ or error
    frames = traceback.extract_tb(cause.__traceback__)
    where = "?"
    for frame in reversed(frames):
        path = Path(frame.filename)
        if ROOT in path.parents and "tests" not in path.parts:
            where = f"{path.relative_to(ROOT)}:{frame.lineno}"
            break
    else:
        if frames:
            where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"
    return f"{type(error).__name__}/{type(cause).__name__}@{where}"


def run_reader(name: str, *, examples: int, seconds: float, random_seed: int | None, real_files: bool) -> ReaderRun:
    run = ReaderRun(name)
    strategy = harness.STRATEGIES[name]
    if real_files and name in harness.real_file_strategies():
        strategy = strategy | harness.real_file_strategies()[name]
    deadline = time.monotonic() + seconds
    start = time.monotonic()

    @settings(
        max_examples=examples,
        derandomize=False,
        database=None,
        deadline=None,  # check_input's own SIGALRM bound catches hangs; a slow example is still a data point
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(data=strategy)
    def fuzz(data: bytes) -> None:
        if time.monotonic() > deadline:
            raise _OutOfTime
        run.tried += 1
        try:
            outcome = harness.check_input(name, data)
        except AssertionError as error:
            signature = _signature(error)
            failure = run.failures.setdefault(signature, Failure(signature, str(error), smallest=data))
            failure.count += 1
            if len(data) < len(failure.smallest):
                failure.smallest, failure.message = data, str(error)
            outcome = "FAILURE"
        run.outcomes[outcome] = run.outcomes.get(outcome, 0) + 1

    if random_seed is not None:
        fuzz = seed(random_seed)(fuzz)
    try:
        fuzz()
    except _OutOfTime:
        pass
    run.seconds = time.monotonic() - start
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readers", default=",".join(harness.READERS),
                        help=f"comma-separated readers (default all: {', '.join(harness.READERS)})")
    parser.add_argument("--examples", type=int, default=2000, help="inputs per reader (default 2000)")
    parser.add_argument("--seconds", type=float, default=float("inf"), help="time budget per reader")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    parser.add_argument("--save-dir", type=Path, default=Path("fuzz_failures"),
                        help="where the smallest input of each failure group is written (default ./fuzz_failures)")
    parser.add_argument("--report", type=Path, help="write the JSON summary here too")
    parser.add_argument("--no-real-files", dest="real_files", action="store_false",
                        help="do not mix in mutations of the real TF fixtures (tests/fixtures/tf_slim)")
    parser.add_argument("--write-hand-made", type=Path, metavar="DIR",
                        help="write the hand-made hostile inputs as DIR/<reader>/hand_<name>.bin and exit "
                        "(DIR is normally tests/fuzz_corpus)")
    args = parser.parse_args(argv)
    if args.write_hand_made:
        for reader, inputs in harness.hand_made_inputs().items():
            for name, data in inputs.items():
                target = args.write_hand_made / reader / f"hand_{name}.bin"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
        return 0
    names = [n.strip() for n in args.readers.split(",") if n.strip()]
    unknown = sorted(set(names) - set(harness.READERS))
    if unknown:
        parser.error(f"unknown readers {unknown}; choose from {sorted(harness.READERS)}")
    logging.disable(logging.WARNING)  # readers log skipped tensors; thousands of lines say nothing here
    warnings.simplefilter("ignore")  # torch warns about odd pickle protocols, Pillow about big images: noise here
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    if torch_threads is None:
        import torch

        torch.set_num_threads(1)

    summaries = []
    for name in names:
        run = run_reader(name, examples=args.examples, seconds=args.seconds, random_seed=args.seed,
                         real_files=args.real_files)
        for failure in run.failures.values():
            digest = hashlib.sha1(failure.smallest).hexdigest()[:12]
            target = args.save_dir / name / f"{digest}.bin"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(failure.smallest)
        summary = run.summary()
        summaries.append(summary)
        print(json.dumps(summary), flush=True)
    total = {
        "readers": summaries,
        "inputs_tried": sum(s["inputs_tried"] for s in summaries),
        "seconds": round(sum(s["seconds"] for s in summaries), 1),
        "distinct_failures": sum(s["distinct_failures"] for s in summaries),
        "seed": args.seed,
    }
    if args.report:
        args.report.write_text(json.dumps(total, indent=2) + "\n")
    print(json.dumps({k: v for k, v in total.items() if k != "readers"}))
    return 1 if total["distinct_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
