"""Choose the quickstart's settings on dev data: run the quickstart recipe with overrides, scored on STS-B dev and
TrecQA dev (never the test rows), and record per step CPU seconds, wall seconds and peak RSS.

Each step runs in its own process (``kalm-st run RECIPE --only STEP``) under ``/usr/bin/time``, so every step gets
its own CPU time and max RSS. The recipe runner skips a step whose fingerprint is unchanged, so trials that change
only later stages reuse the earlier steps' outputs (one shared ``--work-dir``). The two eval steps read a dev folder
in mteb's local layout written here: ``--stsb-pairs`` STS-B dev pairs (seed 0) and the first ``--trecqa-questions``
TrecQA dev questions with a correct and a wrong candidate.

    python benchmarks/quickstart_select.py --trial base                       # the recipe as it is
    python benchmarks/quickstart_select.py --trial lr2e-4 --set stage3.set.args.learning_rate=2e-4
    python benchmarks/quickstart_select.py --report                           # the table of every trial

Results append to ``{work_dir}/trials.jsonl``; the last printed line is the trial's dev scores and CPU seconds.
CPU seconds (user + sys, 2 threads) estimate an idle machine's wall time as about CPU / 2 on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "training" / "recipes" / "quickstart.yaml"
SOURCE = REPO.parent / "shared" / "data"
STEPS = (
    "zero_shot",
    "stage1",
    "filter_sts",
    "mine_sts",
    "filter_trecqa",
    "mine_trecqa",
    "label_banking77",
    "stage2",
    "teacher",
    "stage3",
    "soup",
    "trained",
)
EVAL_STEPS = ("zero_shot", "trained")


def write_dev(folder: Path, source: Path, stsb_pairs: int, trecqa_questions: int) -> None:
    """STS-B dev pairs and TrecQA dev questions, in the layout of ``data/quickstart/eval`` (mteb reads ``test.csv``)."""
    with (source / "stsb" / "dev.csv").open(encoding="utf8", newline="") as handle:
        pairs = list(csv.reader(handle))
    pairs = random.Random(0).sample(pairs, min(stsb_pairs, len(pairs)))
    (folder / "stsb").mkdir(parents=True, exist_ok=True)
    with (folder / "stsb" / "test.csv").open("w", encoding="utf8", newline="") as handle:
        csv.writer(handle).writerows(pairs)
    with (source / "trecqa" / "dev.csv").open(encoding="utf8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels: dict[str, set[str]] = {}
    for row in rows:
        labels.setdefault(row["qtext"], set()).add(row["label"])
    keep = {q for q, seen in labels.items() if seen == {"0", "1"}}
    keep = set([q for q in labels if q in keep][:trecqa_questions])
    (folder / "trecqa").mkdir(parents=True, exist_ok=True)
    with (folder / "trecqa" / "test.csv").open("w", encoding="utf8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["qtext", "label", "atext"])
        writer.writeheader()
        writer.writerows(r for r in rows if r["qtext"] in keep)


def run_step(step: str, overrides: list[str], work_dir: Path, dev_dir: Path) -> dict:
    timing = work_dir / "time.txt"
    sets = [f"output_dir={work_dir / 'run'}", *overrides]
    if step in EVAL_STEPS:
        sets.append(f"{step}.data_dir={dev_dir}")
    command = ["/usr/bin/time", "-f", "%e %U %S %M", "-o", str(timing), "nice", "-n", "19"]
    command += [sys.executable, "-m", "kalm_st.cli", "run", str(RECIPE), "--only", step]
    for item in sets:
        command += ["--set", item]
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
        raise SystemExit(f"step {step} failed (rc {out.returncode})")
    wall, user, system, max_kb = timing.read_text().split()[-4:]
    skipped = f"step {step} " in out.stdout + out.stderr and "up to date, skipped" in out.stdout + out.stderr
    return {
        "step": step,
        "wall_s": float(wall),
        "cpu_s": float(user) + float(system),
        "max_rss_gib": int(max_kb) / 2**20,
        "skipped": skipped,
    }


def scores(work_dir: Path, step: str) -> dict[str, float]:
    return json.loads((work_dir / "run" / step / "scores.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trial", help="name of this trial")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="STEP.KEY=VALUE")
    parser.add_argument("--work-dir", type=Path, default=REPO / "outputs" / "quickstart_select")
    parser.add_argument("--data-dir", type=Path, default=SOURCE)
    parser.add_argument("--stsb-pairs", type=int, default=400)
    parser.add_argument("--trecqa-questions", type=int, default=30)
    parser.add_argument("--skip", nargs="*", default=[], choices=["zero_shot"], help="steps not to run")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    trials = args.work_dir / "trials.jsonl"
    if not args.report:
        dev_dir = args.work_dir / "dev"
        write_dev(dev_dir, args.data_dir, args.stsb_pairs, args.trecqa_questions)
        started = time.time()
        steps = []
        for step in [s for s in STEPS if s not in args.skip]:
            steps.append(run_step(step, args.overrides, args.work_dir, dev_dir))
            s = steps[-1]
            print(
                f"{step:16} {'skipped' if s['skipped'] else 'ran':8} cpu {s['cpu_s']:7.1f} s  wall {s['wall_s']:7.1f} s"
                f"  max RSS {s['max_rss_gib']:.2f} GiB",
                flush=True,
            )
        record = {
            "trial": args.trial,
            "overrides": args.overrides,
            "steps": steps,
            "zero_shot": None if "zero_shot" in args.skip else scores(args.work_dir, "zero_shot"),
            "trained": scores(args.work_dir, "trained"),
            "wall_s": time.time() - started,
        }
        with trials.open("a", encoding="utf8") as handle:
            handle.write(json.dumps(record) + "\n")
    for line in trials.read_text().splitlines():
        r = json.loads(line)
        train = sum(s["cpu_s"] for s in r["steps"] if s["step"].startswith("stage") and not s["skipped"])
        print(
            f"{r['trial']}: dev {r['trained']}  (zero-shot {r['zero_shot']}); training CPU s {train:.0f}; "
            f"overrides {' '.join(r['overrides']) or '-'}"
        )


if __name__ == "__main__":
    main()
