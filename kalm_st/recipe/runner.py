"""Run a recipe: steps in order, each skipped when done, re-run when its config or inputs changed, resumed when
interrupted.

How a step is decided (the DVC model: fingerprints of inputs and resolved config, nothing else):

- Its **fingerprint** is a hash of its kind, its resolved settings (a train step: the whole merged stage config),
  and the fingerprint of each input: an earlier step's fingerprint for ``@step`` (so a re-run propagates to every
  step after it), a content hash for a local file up to :data:`HASH_LIMIT` bytes (size and modification time above
  it, and for the files of a folder), and the value itself for remote ids (Hub models and datasets, built-ins).
- A completed step wrote ``{step_dir}/manifest.json`` (fingerprint, resolved config, inputs, package versions,
  seconds, row counts). Same fingerprint and output present: **skipped**. Otherwise it runs.
- A running step first writes ``{step_dir}/running.json`` with its fingerprint. Finding that marker with the same
  fingerprint means the step was interrupted: it **resumes** (training from its last complete checkpoint, mining and
  teacher scores from their caches under the step folder). A marker of another fingerprint means stale work: the
  step folder is cleared first.

``--dry-run`` (:func:`check_recipe`) validates every step, the step graph and the local sources before any compute and
reports every problem at once; what it cannot check offline (Hub ids) is listed.

Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) every process runs the recipe: train steps run on all
of them (the Trainer's data parallelism); every other step (curation, soup, eval, push) runs on global rank 0 only,
which encodes on all of its node's GPUs with sentence-transformers' multi-process pool, while the other ranks wait
for the step's manifest. Rank 0 alone writes markers, manifests and a train step's copied output. The output folder
must be shared by the processes (one node, or a shared file system).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kalm_st.io import write_json_atomic
from kalm_st.memory import release_memory
from kalm_st.recipe.config import FINAL_MODEL_DIRNAME, ConfigError
from kalm_st.recipe.recipe import REFERENCE_PREFIX, STEP_KINDS, Recipe, RecipeError, Step, is_reference
from kalm_st.recipe.steps import StepContext

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
RUNNING = "running.json"
HASH_LIMIT = 64 * 2**20
"""Local files up to this size are fingerprinted by content; larger ones (and folder members) by size + mtime."""
_REMOTE_PREFIXES = ("hf://", "builtin:")
_FILE_SUFFIXES = frozenset(
    {".jsonl", ".json", ".csv", ".tsv", ".parquet", ".yaml", ".yml", ".txt", ".safetensors", ".bin", ".pt", ".gguf"}
)
_VERSION_PACKAGES = ("kalm-st", "torch", "transformers", "sentence-transformers", "datasets", "mteb")


@dataclass
class StepPlan:
    """A step with its folders, resolved settings, inputs and fingerprint."""

    step: Step
    step_dir: Path
    output: Path | None
    settings: Any
    inputs: list[str]
    fingerprint: str
    config: dict[str, Any]


@dataclass
class RecipeReport:
    """What a run (or a dry run) did: per step ``ran``, ``skipped``, ``resumed`` or ``checked``."""

    status: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    unchecked: list[str] = field(default_factory=list)
    """Inputs a dry run could not check offline (Hub models and datasets)."""


# ----------------------------------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def path_fingerprint(value: str) -> str:
    """Content hash of a small local file, size + mtime of a large one or of a folder's files, else the value."""
    path = Path(value)
    if path.is_file():
        stat = path.stat()
        if stat.st_size <= HASH_LIMIT:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(2**20), b""):
                    digest.update(chunk)
            return f"sha256:{digest.hexdigest()}"
        return f"stat:{stat.st_size}:{stat.st_mtime_ns}"
    if path.is_dir():
        entries = sorted(
            (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()
        )
        return f"dir:{_sha256(json.dumps(entries).encode())}"
    return f"id:{value}"


def is_remote(value: str, *, model: bool) -> bool:
    """A Hub dataset (``hf://``), a built-in backbone, or (for a model) an ``org/name`` Hub id that is not a local
    path. Data inputs are local files unless they say ``hf://``."""
    if value.startswith(_REMOTE_PREFIXES):
        return True
    # "Qwen/Qwen2-0.5B" is a Hub id: only a file suffix (".jsonl", ".yaml", ...) makes "x/y.z" a local path
    hub_id = (
        value.count("/") == 1
        and not value.startswith((".", "/", "~"))
        and Path(value).suffix.lower() not in _FILE_SUFFIXES
    )
    return model and hub_id and not Path(value).exists()


def _resolve(value: Any, outputs: dict[str, Path], fingerprints: dict[str, str], as_path: bool) -> Any:
    """Replace ``@step`` by the step's output path (``as_path``) or by ``@step#fingerprint`` (for hashing)."""
    if is_reference(value):
        name = value[len(REFERENCE_PREFIX) :]
        return str(outputs[name]) if as_path else f"@{name}#{fingerprints[name]}"
    if isinstance(value, dict):
        return {k: _resolve(v, outputs, fingerprints, as_path) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_resolve(v, outputs, fingerprints, as_path) for v in value)
    return value


def _resolved_settings(step: Step, outputs: dict[str, Path], fingerprints: dict[str, str], as_path: bool) -> Any:
    values = {
        name: _resolve(getattr(step.settings, name), outputs, fingerprints, as_path) for name in asdict(step.settings)
    }
    return replace(step.settings, **values)


# ----------------------------------------------------------------------------------------------------------------------
# Planning and checking
# ----------------------------------------------------------------------------------------------------------------------


def _graph_problems(recipe: Recipe) -> list[str]:
    source = str(recipe.path)
    problems: list[str] = []
    seen: dict[str, int] = {}
    outputs: dict[str, str] = {}
    names = [step.name for step in recipe.steps]
    refs = {step.name: step.references() for step in recipe.steps}
    for index, step in enumerate(recipe.steps):
        if step.name in seen:
            problems.append(f"{source}: steps[{index}]: two steps are named {step.name!r} (steps[{seen[step.name]}]).")
            continue
        seen[step.name] = index
        output = step.output_path(Path(recipe.output_dir) / step.name)
        if output is not None:
            key = os.path.normpath(output)
            if key in outputs:
                problems.append(
                    f"{source}: steps {outputs[key]!r} and {step.name!r} both write {key}; give one another output."
                )
            outputs[key] = step.name
        for ref in refs[step.name]:
            if ref not in names:
                problems.append(f"{source}: step {step.name!r}: '@{ref}' names no step of the recipe.")
            elif ref not in seen or ref == step.name:
                if _reaches(refs, ref, step.name):
                    problems.append(
                        f"{source}: step {step.name!r}: '@{ref}' makes a cycle ({step.name} -> {ref} -> ... -> {step.name})."
                    )
                else:
                    problems.append(
                        f"{source}: step {step.name!r}: '@{ref}' is a later step; inputs must come from earlier steps."
                    )
    return problems


def _reaches(refs: dict[str, list[str]], start: str, target: str) -> bool:
    stack, visited = [start], set()
    while stack:
        name = stack.pop()
        if name == target:
            return True
        if name in visited:
            continue
        visited.add(name)
        stack.extend(refs.get(name, []))
    return False


def plan_recipe(recipe: Recipe) -> tuple[list[StepPlan], list[str], list[str]]:
    """Plan every step (resolved settings, inputs, fingerprints) and collect every problem found on the way.

    Returns ``(plans, problems, unchecked)``: plans of the steps that could be planned, problems (each naming the step,
    key and file), and inputs that could not be checked offline.
    """
    problems = _graph_problems(recipe)
    if problems:
        return [], problems, []
    outputs: dict[str, Path] = {}
    fingerprints: dict[str, str] = {}
    plans: list[StepPlan] = []
    unchecked: list[str] = []
    for step in recipe.steps:
        step_dir = Path(recipe.output_dir) / step.name
        output = step.output_path(step_dir)
        produced = {str(path) for path in outputs.values()}
        bad_ref = [ref for ref in step.references() if ref not in fingerprints]
        if bad_ref:  # an earlier step failed to plan; its problem is already reported
            continue
        try:
            settings = _resolved_settings(step, outputs, fingerprints, as_path=True)
            hashed = _resolved_settings(step, outputs, fingerprints, as_path=False)
            kind = STEP_KINDS[step.kind]
            if kind.plan is not None:
                inputs, resolved = kind.plan(settings, hashed, step, step_dir)
            else:
                inputs, resolved = kind.inputs_of(settings), asdict(hashed)
        except (ConfigError, FileNotFoundError) as error:
            problems.append(str(error))
            continue
        input_fingerprints = {}
        for value, is_model in inputs:
            if value in produced:
                continue  # an earlier step's output: its fingerprint is already in the resolved config
            if value.startswith("builtin:"):  # shipped with kalm-st or a wheel: nothing to check
                input_fingerprints[value] = f"id:{value}"
            elif is_remote(value, model=is_model):
                unchecked.append(f"step {step.name!r}: {value}")
                input_fingerprints[value] = f"id:{value}"
            elif not is_model and any(c in value for c in "*?["):  # a glob of shards
                matches = sorted(glob.glob(value, recursive=True))
                if not matches:
                    problems.append(f"{recipe.path}: step {step.name!r}: input {value!r} matches no file.")
                else:
                    input_fingerprints[value] = _sha256(json.dumps([path_fingerprint(m) for m in matches]).encode())
            elif not Path(value).exists():
                problems.append(f"{recipe.path}: step {step.name!r}: input {value!r} does not exist.")
            else:
                input_fingerprints[value] = path_fingerprint(value)
        resolved_config = {"kind": step.kind, "settings": resolved, "seed": recipe.seed}
        fingerprint = _sha256(json.dumps([resolved_config, input_fingerprints], sort_keys=True, default=str).encode())
        fingerprints[step.name] = fingerprint
        if output is not None:
            outputs[step.name] = output
        plans.append(StepPlan(step, step_dir, output, settings, [v for v, _ in inputs], fingerprint, resolved_config))
    return plans, problems, unchecked


def check_recipe(recipe: Recipe) -> list[str]:
    """``--dry-run``: every problem at once (raises :class:`RecipeError`), else the inputs left unchecked (remote)."""
    plans, problems, unchecked = plan_recipe(recipe)
    if problems:
        raise RecipeError(problems)
    return unchecked


# ----------------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in _VERSION_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def read_manifest(step_dir: Path) -> dict[str, Any] | None:
    path = step_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf8"))
    except (OSError, json.JSONDecodeError):
        logger.warning("%s is unreadable; the step runs again.", path)
        return None


def is_done(plan: StepPlan) -> bool:
    """Complete with this fingerprint: its output is there, or was removed on purpose (``pruned``) once every step
    reading it was done, like ``make``'s intermediate files."""
    manifest = read_manifest(plan.step_dir)
    if manifest is None or manifest.get("fingerprint") != plan.fingerprint:
        return False
    return plan.output is None or plan.output.exists() or bool(manifest.get("pruned"))


def _is_pruned(plan: StepPlan) -> bool:
    """Done, but its output was removed (``keep_intermediate_models: false``): a step that must run and reads it
    makes it run again first."""
    return plan.output is not None and not plan.output.exists() and is_done(plan)


def _readers(plans: list[StepPlan]) -> dict[str, list[StepPlan]]:
    """For each step, the steps that reference it (``@step``)."""
    readers: dict[str, list[StepPlan]] = {p.step.name: [] for p in plans}
    for plan in plans:
        for ref in dict.fromkeys(plan.step.references()):
            readers[ref].append(plan)
    return readers


def _builtin_inputs(plan: StepPlan) -> list[str]:
    return [value for value in plan.inputs if value.startswith("builtin:")]


def prune_intermediate_models(plans: list[StepPlan], builtin_dir: Path) -> list[Path]:
    """Remove the models no later step needs: a train step's default output (``final/``, and its checkpoints) once it
    has readers and all of them are done, and a converted built-in backbone once every step naming it is done. Its
    manifest stays (marked ``pruned``), so the step still counts as done. Returns the removed folders."""
    removed: list[Path] = []
    readers = _readers(plans)
    for plan in plans:
        default_output = plan.step_dir / FINAL_MODEL_DIRNAME
        if plan.step.kind != "train" or plan.output != default_output or not plan.output.exists():
            continue  # an explicit output: (a deliverable) is never removed
        if not readers[plan.step.name] or not is_done(plan):
            continue
        if not all(is_done(reader) for reader in readers[plan.step.name]):
            continue
        manifest = read_manifest(plan.step_dir) or {}
        write_json_atomic(plan.step_dir / MANIFEST, {**manifest, "pruned": True})
        for folder in [plan.output, *sorted(plan.step_dir.glob("checkpoint-*"))]:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for name in dict.fromkeys(value for plan in plans for value in _builtin_inputs(plan)):
        folder = builtin_dir / name.removeprefix("builtin:")
        users = [plan for plan in plans if name in _builtin_inputs(plan)]
        if folder.is_dir() and all(is_done(plan) for plan in users):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    for folder in removed:
        logger.info("removed %s (keep_intermediate_models: false; every step reading it is done)", folder)
    return removed


def _to_run(plans: list[StepPlan], selected: list[StepPlan], start: str | None, only: str | None) -> set[str]:
    """The selected steps that run: not done (or forced by ``--from`` / ``--only``), plus every pruned step whose
    output one of them reads (and, in turn, what that one reads)."""
    forced = {name for name in (start, only) if name is not None}
    names = {p.step.name for p in selected if p.step.name in forced or not is_done(p)}
    by_name = {p.step.name: p for p in plans}
    for plan in reversed(plans):  # references point to earlier steps: one backward pass closes the set
        if plan.step.name not in names:
            continue
        for ref in plan.step.references():
            if _is_pruned(by_name[ref]):
                if only is not None:
                    raise ConfigError(
                        f"step {plan.step.name!r} needs the model of step {ref!r}, which was removed "
                        "(keep_intermediate_models: false); run without --only to rebuild it."
                    )
                names.add(ref)
    return names


def _prepare(plan: StepPlan) -> bool:
    """Write the running marker; return True when an interrupted run of the same fingerprint can be resumed."""
    marker = plan.step_dir / RUNNING
    resume = False
    if marker.is_file():
        try:
            resume = json.loads(marker.read_text(encoding="utf8")).get("fingerprint") == plan.fingerprint
        except (OSError, json.JSONDecodeError):
            resume = False
    if not resume and plan.step_dir.exists():
        why = "its model was removed; rebuilding it" if _is_pruned(plan) else "left by another configuration"
        logger.info("step %s: clearing %s (%s)", plan.step.name, plan.step_dir, why)
        shutil.rmtree(plan.step_dir)
    (plan.step_dir / MANIFEST).unlink(missing_ok=True)
    write_json_atomic(marker, {"fingerprint": plan.fingerprint, "started": time.time()})
    return resume


WAIT_POLL_SECONDS = 1.0


def _wait_for(plan: StepPlan, what: str) -> None:
    """Block until rank 0 wrote this step's manifest (``"manifest"``) or running marker (``"marker"``) with the
    step's fingerprint. No timeout: if rank 0 fails, the launcher (torchrun) stops every process."""
    path = plan.step_dir / (MANIFEST if what == "manifest" else RUNNING)
    begin = last_log = time.monotonic()
    while True:
        try:
            if json.loads(path.read_text(encoding="utf8")).get("fingerprint") == plan.fingerprint:
                return
        except (OSError, json.JSONDecodeError):
            pass
        if time.monotonic() - last_log > 300:
            logger.info("step %s: still waiting for rank 0 (%.0f s)", plan.step.name, time.monotonic() - begin)
            last_log = time.monotonic()
        time.sleep(WAIT_POLL_SECONDS)


def _select(plans: list[StepPlan], start: str | None, only: str | None) -> list[StepPlan]:
    names = [p.step.name for p in plans]
    for option, value in (("--from", start), ("--only", only)):
        if value is not None and value not in names:
            raise ConfigError(f"{option} {value!r}: no such step (steps: {', '.join(names)}).")
    if only is not None:
        return [p for p in plans if p.step.name == only]
    if start is not None:
        return plans[names.index(start) :]
    return plans


def run_recipe(
    recipe: Recipe, *, dry_run: bool = False, start: str | None = None, only: str | None = None
) -> RecipeReport:
    """Run (or with ``dry_run`` only check) the recipe's steps; see the module docstring for skip / resume rules.

    Args:
        recipe: A loaded recipe (:func:`kalm_st.recipe.recipe.load_recipe`).
        dry_run: Validate every step, the graph and the local sources; run nothing.
        start: ``--from``: run this step and the ones after it (earlier ones must be complete).
        only: ``--only``: run just this step (its inputs must exist).
    """
    report = RecipeReport()
    plans, problems, unchecked = plan_recipe(recipe)
    report.unchecked = unchecked
    if problems:
        raise RecipeError(problems)
    selected = _select(plans, start, only)
    if dry_run:
        for plan in selected:
            report.status[plan.step.name] = "checked"
        return report
    builtin_dir = Path(recipe.output_dir) / "builtin"
    selected_names = {p.step.name for p in selected}
    rank = int(os.environ.get("RANK", "0"))  # set by torchrun / accelerate launch; 0 without a launcher
    main = rank == 0
    to_run = _to_run(plans, selected, start, only)
    for plan in plans:
        name = plan.step.name
        if name not in selected_names and name not in to_run:
            continue
        if name not in to_run:
            logger.info("step %s (%s): up to date, skipped", name, plan.step.kind)
            report.status[name] = "skipped"
            continue
        for ref in plan.step.references():
            ref_plan = next(p for p in plans if p.step.name == ref)
            if not is_done(ref_plan) or _is_pruned(ref_plan):
                raise ConfigError(
                    f"step {name!r} needs the output of step {ref!r}, which is not complete; run it first."
                )
        if not main and not STEP_KINDS[plan.step.kind].every_rank:
            logger.info("step %s (%s): runs on rank 0; rank %d waits", name, plan.step.kind, rank)
            _wait_for(plan, "manifest")
            report.status[name] = "ran on rank 0"
            continue
        if main:
            resume = _prepare(plan)
        else:  # rank 0 decides (and clears stale work); a complete checkpoint then means a resume for everyone
            _wait_for(plan, "marker")
            resume = True
        logger.info("step %s (%s): %s", name, plan.step.kind, "resuming" if resume else "starting")
        begin = time.perf_counter()
        context = StepContext(
            plan.step, plan.settings, plan.step_dir, plan.output, builtin_dir, resume, recipe.seed, main
        )
        summary = STEP_KINDS[plan.step.kind].run(context)
        seconds = time.perf_counter() - begin
        release_memory()  # the next step's peak should not stack on this one's leftovers
        if not main:
            _wait_for(plan, "manifest")
            report.status[name] = "ran"
            report.seconds[name] = seconds
            continue
        manifest = {
            "step": name,
            "kind": plan.step.kind,
            "fingerprint": plan.fingerprint,
            "config": plan.config,
            "inputs": plan.inputs,
            "output": str(plan.output) if plan.output is not None else None,
            "versions": _versions(),
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "summary": summary,
        }
        write_json_atomic(plan.step_dir / MANIFEST, manifest)
        (plan.step_dir / RUNNING).unlink(missing_ok=True)
        report.status[name] = "resumed" if resume else "ran"
        report.seconds[name] = seconds
        logger.info("step %s (%s): done in %.1f s", name, plan.step.kind, seconds)
        if not recipe.keep_intermediate_models:
            prune_intermediate_models(plans, builtin_dir)
    return report


__all__ = [
    "HASH_LIMIT",
    "MANIFEST",
    "RecipeError",
    "RecipeReport",
    "StepPlan",
    "check_recipe",
    "is_done",
    "path_fingerprint",
    "plan_recipe",
    "prune_intermediate_models",
    "read_manifest",
    "run_recipe",
]
