"""Choose the quickstart's settings on dev data: run the quickstart recipe with overrides, scored on STS-B dev and
TrecQA dev (never the test rows), and record the run's CPU seconds, peak RSS and each step's seconds.

One ``kalm-st run`` per trial and seed, under ``/usr/bin/time``, in ``{work_dir}/seed{S}``: the recipe runner skips
every step whose fingerprint (settings and inputs) is unchanged, so a trial that changes only later stages reuses the
earlier steps' outputs of the same seed (intermediate models are kept for that). ``--seed S`` sets every seed of the
recipe (its data draws, each stage's model and Trainer seed, mining and labelling; the loss settings' mixing seeds
stay 0), as the spread over seeds in ``docs/quickstart.md``. The two eval steps read a dev folder in mteb's local
layout written here: ``--stsb-pairs`` STS-B dev pairs (seed 0) and the first ``--trecqa-questions`` TrecQA dev
questions with a correct and a wrong candidate. ``--skip zero_shot`` starts (``--from``, which always re-runs its
step) at the first later step that the runner would not skip (its fingerprint changed, or it never finished).

    python benchmarks/quickstart_select.py --trial base --seed 0               # the recipe as it is
    python benchmarks/quickstart_select.py --trial lr1e-4 --seed 0 --skip zero_shot \
        --set stage2.set.args.learning_rate=1.0e-4 --set stage3.set.args.learning_rate=1.0e-4
    python benchmarks/quickstart_select.py --report                           # every trial, and its mean over seeds

Write rates with a dot (``1.0e-4``): YAML reads ``1e-4`` as a string. Results append to ``{work_dir}/trials.jsonl``;
the run's log is ``{work_dir}/seed{S}/last_run.log``, its model ``{work_dir}/seed{S}/models/{trial}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
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


SEEDED_STEPS = ("stage1.set", "stage2.set", "stage3.set", "mine_sts", "mine_trecqa", "label_banking77")


def seed_overrides(seed: int) -> list[str]:
    """Every seed of the quickstart recipe (``docs/recipes.md``, "Seeds"), so that a seed is a whole other draw."""
    return [f"seed={seed}", *(f"{step}.seed={seed}" for step in SEEDED_STEPS)]


def first_stale_step(sets: list[str], after: str) -> str:
    """The first step after ``after`` that the runner would not skip (:func:`kalm_st.recipe.runner.is_done`: its
    settings, inputs or kalm-st's config schema changed, or it never finished); the last step when every one is done."""
    from kalm_st.recipe.recipe import load_recipe
    from kalm_st.recipe.runner import is_done, plan_recipe

    plans, problems, _ = plan_recipe(load_recipe(RECIPE, sets))
    if problems:
        raise SystemExit("\n".join(problems))
    rest = [plan for plan in plans if STEPS.index(plan.step.name) > STEPS.index(after)]
    return next((plan.step.name for plan in rest if not is_done(plan)), rest[-1].step.name)


def run_recipe(overrides: list[str], seed: int, trial: str, work_dir: Path, dev_dir: Path, skip: list[str]) -> dict:
    """One ``kalm-st run`` (steps whose fingerprint is unchanged are skipped) under ``/usr/bin/time``; the trial's
    model is kept in ``{work_dir}/models/{trial}`` (to score the chosen trial on the test rows afterwards)."""
    timing = work_dir / "time.txt"
    sets = [f"output_dir={work_dir / 'run'}", "keep_intermediate_models=true", *seed_overrides(seed), *overrides]
    sets.append(f"soup.output={work_dir / 'models' / trial}")
    sets += [f"{step}.data_dir={dev_dir}" for step in EVAL_STEPS]
    command = ["/usr/bin/time", "-f", "%e %U %S %M", "-o", str(timing), "nice", "-n", "19"]
    command += [sys.executable, "-m", "kalm_st.cli", "run", str(RECIPE)]
    if skip:  # --from forces its step to re-run: start at the first step after the skipped ones that is not done
        command += ["--from", first_stale_step(sets, skip[-1])]
    for item in sets:
        command += ["--set", item]
    with (work_dir / "last_run.log").open("w") as log:
        rc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"kalm-st run failed (rc {rc}): {work_dir / 'last_run.log'}")
    wall, user, system, max_kb = timing.read_text().split()[-4:]
    steps = {}
    for step in STEPS:
        manifest = work_dir / "run" / step / "manifest.json"
        if manifest.exists():
            steps[step] = json.loads(manifest.read_text()).get("seconds")
    return {
        "wall_s": float(wall),
        "cpu_s": float(user) + float(system),
        "max_rss_gib": int(max_kb) / 2**20,
        "step_wall_s": steps,
    }


def scores(work_dir: Path, step: str) -> dict[str, float]:
    return json.loads((work_dir / "run" / step / "scores.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trial", help="name of this trial")
    parser.add_argument("--seed", type=int, default=0, help="sets every seed of the recipe (default 0: as shipped)")
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
        if not args.trial:
            parser.error("--trial NAME is needed to run a trial (or --report)")
        dev_dir = args.work_dir / "dev"
        write_dev(dev_dir, args.data_dir, args.stsb_pairs, args.trecqa_questions)
        seed_dir = args.work_dir / f"seed{args.seed}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        run = run_recipe(args.overrides, args.seed, args.trial, seed_dir, dev_dir, args.skip)
        print(json.dumps(run), flush=True)
        record = {
            "trial": args.trial,
            "seed": args.seed,
            "overrides": args.overrides,
            "run": run,
            "zero_shot": None if "zero_shot" in args.skip else scores(seed_dir, "zero_shot"),
            "trained": scores(seed_dir, "trained"),
        }
        with trials.open("a", encoding="utf8") as handle:
            handle.write(json.dumps(record) + "\n")
    records = [json.loads(line) for line in trials.read_text().splitlines()]
    for r in records:
        run = r["run"]
        steps = ", ".join(f"{k} {v:.0f}" for k, v in run["step_wall_s"].items())
        print(
            f"{r['trial']} (seed {r.get('seed', 0)}): dev {r['trained']} (zero-shot {r['zero_shot']}); this run: "
            f"CPU {run['cpu_s']:.0f} s, max RSS {run['max_rss_gib']:.2f} GiB; step wall s: {steps}; "
            f"overrides: {' '.join(r['overrides'])}"
        )
    print(over_seeds(records))


def over_seeds(records: list[dict]) -> str:
    """A markdown table: each trial's dev scores per seed (the last record of a trial and seed), mean and minimum."""
    latest: dict[str, dict[int, dict[str, float]]] = {}
    for r in records:
        latest.setdefault(r["trial"], {})[r.get("seed", 0)] = r["trained"]
    lines = ["| trial | task | per seed | mean | min |", "|---|---|---|---:|---:|"]
    for trial, by_seed in latest.items():
        for task in sorted({task for task_scores in by_seed.values() for task in task_scores}):
            values = {seed: task_scores[task] for seed, task_scores in sorted(by_seed.items()) if task in task_scores}
            per_seed = " / ".join(f"{seed}: {value:.2f}" for seed, value in values.items())
            mean = sum(values.values()) / len(values)
            lines.append(f"| {trial} | {task} | {per_seed} | {mean:.2f} | {min(values.values()):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
