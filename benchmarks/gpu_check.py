"""The GPU check of kalm-st, one prepared command: it runs the GPU case of each benchmark it lists.

    python benchmarks/gpu_check.py                 # a CUDA machine; about 3 min on one H100/H200, capped at 7 min
    python benchmarks/gpu_check.py --cpu-smoke     # every case on a tiny config on CPU (the default test suite runs it)

A case is a function ``gpu_case(ctx)`` beside the benchmark it checks (``benchmarks/gpu_lib.py`` says what it gets
and returns); :data:`CASES` lists them, one line each. The report, ``gpu_check.json`` and ``gpu_check.md`` in
``--output-dir`` (default ``outputs/gpu_check``), is rewritten after every case, so a crash or a kill still leaves
the cases done so far. Each case, and each configuration inside it, is wrapped: an exception (CUDA out of memory
included) is recorded with its traceback and the rest still runs. A time budget (``--budget-s``) guards the total:
every case gets at most its cap and what is left, enforced by a timer; cases that no longer fit are skipped.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark modules, imported by name

from gpu_lib import REPO, BudgetExceeded, GpuContext, error_record  # noqa: E402

CASES: tuple[tuple[str, str, float], ...] = (
    # (name, "module:function" in benchmarks/, cap in seconds on the GPU): add a case with one line
    ("tests", "gpu_lib:attention_tests_case", 120.0),
    ("train", "train_throughput:gpu_case", 150.0),
    ("loss", "loss_overhead:gpu_case", 90.0),
    ("encode", "encode_speed:gpu_case", 60.0),
    ("unpad", "train_throughput:unpad_gpu_case", 60.0),
    ("fsdp2", "shard_memory:gpu_case", 60.0),
)
NAMES = tuple(name for name, _, _ in CASES)
SCHEMA_VERSION = 2


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`BudgetExceeded` in the main thread after ``seconds``."""

    def expire(signum: int, frame: Any) -> None:
        raise BudgetExceeded(f"ran past its {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_case(name: str, target: str, ctx: GpuContext, seconds: float) -> dict[str, Any]:
    """Run one case under a ``seconds`` timer; the record says ok / error / timeout and never raises."""
    start = time.perf_counter()
    record: dict[str, Any] = {"status": "ok", "limit_s": round(seconds, 1), "result": None}
    ctx.deadline = start + seconds
    try:
        with time_limit(seconds):
            module, function = target.split(":")
            record["result"] = getattr(importlib.import_module(module), function)(ctx)
    except BudgetExceeded as error:
        record.update(status="timeout", error=f"{name}: {error}")
    except Exception as error:  # noqa: BLE001 - the point is to record any failure and go on
        record.update(error_record(error))
    ctx.free_memory()
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def environment(ctx: GpuContext) -> dict[str, Any]:
    import torch

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    def command(*argv: str) -> str | None:
        try:
            done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = command("git", "rev-parse", "HEAD")
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.backends.cpu.get_cpu_capability()}",
        "packages": {
            name: version(name)
            for name in ("torch", "transformers", "sentence-transformers", "flash-attn", "accelerate", "kalm-st")
        },
        "git_commit": commit
        and commit + (" (uncommitted changes)" if command("git", "status", "--porcelain") else ""),
        "gpu": None,
    }
    if not ctx.smoke:
        props = torch.cuda.get_device_properties(0)
        driver = command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
        env["gpu"] = (
            f"{torch.cuda.get_device_name()} x {torch.cuda.device_count()}, {props.total_memory / 2**30:.1f} GiB, "
            f"capability {'.'.join(map(str, torch.cuda.get_device_capability()))}, CUDA {torch.version.cuda}, "
            f"driver {driver and driver.splitlines()[0]}"
        )
    return env


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, ".4g")
    if isinstance(value, dict):
        return ", ".join(f"{k} {_cell(v)}" for k, v in value.items())
    text = "n/a" if value is None else str(value)
    return text.replace("|", "/").replace("\n", " ")[:160]


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# kalm-st GPU check ({report['mode']})",
        "",
        f"- command: `{report['command']}`",
        f"- started {report['started']}; elapsed {report.get('elapsed_s')} s of a {report['budget_s']:.0f} s budget",
        f"- device: {env['gpu'] or 'CPU'}; CPU: {env['cpu']}; Python {env['python']}; commit {env['git_commit']}",
        "- packages: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in env["packages"].items()),
        "",
        "| case | status | seconds | note |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {case['status']} | {case.get('seconds')} | {_cell(case.get('error') or case.get('reason') or '')} |"
        for name, case in report["cases"].items()
    ]
    lines += ["", "## Goals (None: not decided by this run)", ""]
    lines += [f"- {goal}: {value}" for goal, value in report["goals"].items()]
    for name, case in report["cases"].items():
        result = case.get("result") or {}
        runs = [
            {k: v for k, v in run.items() if k not in ("traceback", "step_s_all")} for run in result.get("runs", [])
        ]
        lines += ["", f"## {name}", "", *result.get("notes", [])]
        if runs:
            columns = list(dict.fromkeys(key for run in runs for key in run))
            lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_cell(run.get(c, "")) for c in columns) + " |" for run in runs]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], output_dir: Path) -> None:
    from kalm_st.io import write_text_atomic

    report["goals"] = {
        goal: value for case in report["cases"].values() for goal, value in ((case.get("result") or {}).get("goals") or {}).items()
    }  # fmt: skip
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(report, indent=1) + "\n"), ("gpu_check.md", markdown(report))):
        write_text_atomic(output_dir / name, text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="every case on a tiny config on CPU")
    parser.add_argument("--output-dir", type=Path, default=REPO / "outputs" / "gpu_check")
    parser.add_argument("--budget-s", type=float, help="total time budget (default 420 on a GPU, 120 for the smoke)")
    parser.add_argument("--cases", default=",".join(NAMES), help=f"comma-separated subset of {','.join(NAMES)}")
    parser.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s for MFU when the device is not known")
    args = parser.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(NAMES)
    if unknown:
        parser.error(f"unknown --cases {sorted(unknown)}; choose from {list(NAMES)}")
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --cpu-smoke, or on a GPU machine.")
    ctx = GpuContext(smoke=args.cpu_smoke, peak_tflops=args.peak_tflops)
    budget = args.budget_s if args.budget_s is not None else (120.0 if args.cpu_smoke else 420.0)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "command": " ".join(["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "budget_s": budget,
        "environment": environment(ctx),
        "cases": {},
    }
    try:
        for name, target, cap in CASES:
            if name not in args.cases.split(","):
                continue
            left = budget - (time.perf_counter() - started) - 2.0  # keep time to write the report
            if left < ctx.min_config_s:
                report["cases"][name] = {"status": "skipped", "reason": "time budget", "seconds": 0.0}
            else:
                report["cases"][name] = run_case(name, target, ctx, min(cap if not ctx.smoke else 90.0, left))
            report["elapsed_s"] = round(time.perf_counter() - started, 1)
            write_report(report, args.output_dir)
            print(f"{name}: {report['cases'][name]['status']} ({report['cases'][name]['seconds']} s)", file=sys.stderr)
    finally:
        ctx.close()
    print(f"report: {args.output_dir / 'gpu_check.md'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
