"""`kiln search`: budget-driven recipe search on Ray, with Optuna choosing the trials.

    search(MODEL, DIR, max_size_mb=60, max_ppl_increase=0.05, objective="speed", trials=12)

- The space is a TOML file of pass parameters and their ranges (`kiln.search.space`); without
  one, the default for the model's task (`kiln/search/spaces/`).
- The reference, the fp32 compile, runs first: it fills the export cache that every trial
  shares, gives the task and the perplexity that the budget is relative to.
- Optuna's TPE sampler asks for each trial (seeded; the budgets are its constraints), and each
  trial is one Ray task (`kiln.search.trial.run_trial`): compile, `kiln eval`, `kiln bench`.
  As many run at once as the cluster has slots of `trial_cpus` CPUs. A trial whose recipe an
  earlier trial already measured reuses that record and does not count towards `trials` (the
  number of distinct recipes measured); 20 such in a row end a search whose space is exhausted.
- Faults: a trial that fails, runs out of memory or passes `trial_timeout_s` is recorded as
  failed and the search goes on. Ray retries a trial once when its worker or node dies. The study
  lives in `DIR/study.journal`: `resume=True` reruns only the trials that did not finish.
- Results: `DIR/trials/NNNN/{recipe.toml,record.json}` for every trial, `DIR/pareto.md` (and
  PNG plots), `DIR/best.toml` and `DIR/best/` (the chosen artifact).

Without `address`, Ray starts embedded on this machine; `address` is a running cluster's
(`HOST:PORT` of `ray start --head`, or `ray://HOST:10001` for Ray Client), and every node needs
kiln installed and the model at the same path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from kiln.errors import KilnError
from kiln.search.report import write_report
from kiln.search.space import Space, SpaceError, default_space, describe, load_space

OBJECTIVES = ("speed", "size", "quality")
STATE = "search.json"
DUPLICATES_BEFORE_STOP = 20
INFEASIBLE = 1e12  # the objective told for a trial over a budget or failed (its constraint says which)


class SearchError(KilnError):
    pass


def _require_search_extra():
    try:
        import optuna
        import ray
        import tomli_w
    except ModuleNotFoundError as exc:
        raise SearchError(f"kiln search needs Ray, Optuna and tomli-w ({exc.name} is missing): "
                          f"pip install 'kiln[search]'") from None
    return ray, optuna, tomli_w


def _check_budgets(max_size_mb, max_ppl_increase, min_cosine, objective):
    if objective not in OBJECTIVES:
        raise SearchError(f"--objective must be one of {', '.join(OBJECTIVES)}, not {objective}")
    from kiln.passes.quality import budget_problem

    if problem := budget_problem(max_ppl_increase, min_cosine):
        raise SearchError(problem)
    if max_size_mb is not None and not max_size_mb > 0:
        raise SearchError(f"--max-size must be above 0 MB, not {max_size_mb}")


def _prepare_output(output: Path, resume: bool, settings: dict) -> dict:
    """A new (or empty) directory for a new search; an earlier search's for `resume`, whose
    settings it keeps (the trial count and the time budget may change)."""
    state = output / STATE
    if resume:
        if not state.is_file():
            raise SearchError(f"{output} holds no search to resume (no {STATE})")
        try:
            saved = json.loads(state.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SearchError(f"{state}: unreadable search state: {exc}") from None
        if not isinstance(saved, dict) or saved.get("model") != settings["model"]:
            raise SearchError(f"{output} is a search of {saved.get('model') if isinstance(saved, dict) else '?'}, "
                              f"not of {settings['model']}")
        return saved
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise SearchError(f"{output} already exists and is not empty: give a new directory, or --resume to "
                          f"continue the search it holds")
    output.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps(settings, indent=2) + "\n")
    return settings


def _objective_value(record: dict, objective: str) -> float:
    """The value Optuna minimises (so speed and cosine are negated)."""
    if objective == "size":
        return record["size_mb"]
    if objective == "speed":
        return -_speed(record)
    quality = record["quality"]
    return quality["ppl_increase"] if "ppl_increase" in quality else -quality["cosine_mean"]


def _speed(record: dict) -> float:
    from kiln.search.trial import SPEED_KEY

    return record["speed"][SPEED_KEY[record["task"]]]


def _parse_seconds(text: str | None, option: str) -> float | None:
    """'30m' / '1h' / '90s' / '45' (minutes) -> seconds."""
    if text is None:
        return None
    t = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale else t) * (scale or 60)
    except ValueError:
        raise SearchError(f"{option}: '{text}' is not a duration like 30m, 1h or 90s") from None
    if not value > 0:
        raise SearchError(f"{option} must be above 0, not {text}")
    return value


def search(model: str, output: str | Path, *, space: str | Path | None = None, max_size_mb: float | None = None,
           max_ppl_increase: float | None = None, min_cosine: float | None = None, objective: str = "speed",
           trials: int = 12, time_budget: str | None = None, trial_timeout: str | None = None,
           address: str | None = None, trial_cpus: int | None = None, corpus: str = "lee", seed: int = 0,
           task: str | None = None, allow_pickle: bool = False, resume: bool = False, console=None) -> dict:
    """Run the search; return {"best": record or None, "trials": [records], "reference": record}."""
    from kiln.corpus import EVAL_CORPORA

    _check_budgets(max_size_mb, max_ppl_increase, min_cosine, objective)
    if corpus not in EVAL_CORPORA:
        raise SearchError(f"unknown corpus '{corpus}': choose one of {', '.join(EVAL_CORPORA)}")
    if trials < 1:
        raise SearchError("--trials must be at least 1")
    budget_s = _parse_seconds(time_budget, "--time-budget")
    timeout_s = _parse_seconds(trial_timeout, "--trial-timeout")
    if space is not None:
        load_space(space)  # checked before anything starts
    model = str(Path(model).expanduser().resolve()) if Path(str(model)).expanduser().exists() else str(model)
    output = Path(output).expanduser()
    settings = {"model": model, "space": str(Path(space).resolve()) if space else None, "max_size_mb": max_size_mb,
                "max_ppl_increase": max_ppl_increase, "min_cosine": min_cosine, "objective": objective,
                "corpus": corpus, "seed": seed, "task": task, "allow_pickle": allow_pickle}
    ray, optuna, tomli_w = _require_search_extra()
    settings = _prepare_output(output, resume, settings)
    started = time.monotonic()  # the time budget counts the reference too
    runner = _Runner(ray, output, settings, address, trial_cpus, timeout_s, console)
    try:
        reference = runner.reference()
        plan = load_space(settings["space"] or default_space(reference["task"]))
        _check_task(reference["task"], settings)
        records = runner.optimise(optuna, tomli_w, plan, trials, None if budget_s is None else started + budget_s)
    finally:
        runner.close()
    best = write_report(output, reference, records, settings, plan.name)
    if best is not None:
        _publish_best(output, best, settings)
    return {"best": best, "trials": records, "reference": reference}


def _check_task(task: str, settings: dict) -> None:
    if task == "causal-lm" and settings["min_cosine"] is not None:
        raise SearchError("--min-cosine is for encoders; a causal LM's budget is --max-ppl-increase")
    if task == "embedding" and settings["max_ppl_increase"] is not None:
        raise SearchError("--max-ppl-increase is for causal LMs; an encoder's budget is --min-cosine")


def _publish_best(output: Path, best: dict, settings: dict) -> None:
    """DIR/best.toml is the chosen trial's recipe; DIR/best/ its artifact (copied when this
    machine can see it, else compiled here from best.toml)."""
    shutil.copyfile(output / "trials" / f"{best['number']:04d}" / "recipe.toml", output / "best.toml")
    target = output / "best"
    if target.exists():
        shutil.rmtree(target)
    source = Path(best.get("artifact") or "")
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        import kiln

        kiln.compile(settings["model"], target, recipe=output / "best.toml", task=settings["task"],
                     allow_pickle=settings["allow_pickle"], progress=False)
    for trial in (output / "trials").iterdir():  # the other artifacts were only needed for measuring
        if (trial / "artifact").is_dir():
            shutil.rmtree(trial / "artifact")


class _Runner:
    """Ray's side: start or join the cluster, run the reference and the trials as tasks."""

    def __init__(self, ray, output: Path, settings: dict, address: str | None, trial_cpus: int | None,
                 timeout_s: float | None, console):
        self.ray, self.output, self.settings, self.timeout_s = ray, output, settings, timeout_s
        self.say = (lambda text: console.print(text, highlight=False, soft_wrap=True)) if console else (lambda text: None)
        try:
            if address:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
            else:
                ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.ERROR,
                         log_to_driver=False)
        except Exception as exc:
            raise SearchError(f"cannot start or reach Ray{' at ' + address if address else ''}: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        most = max(int(n["Resources"].get("CPU", 0)) for n in nodes) if nodes else 1
        self.trial_cpus = min(trial_cpus or os.cpu_count() or 1, max(1, most))
        total = sum(int(n["Resources"].get("CPU", 0)) for n in nodes)
        self.slots = max(1, total // self.trial_cpus)
        self.say(f"Ray: {len(nodes)} node(s), {total} CPU(s); {self.slots} trial(s) at a time, "
                 f"{self.trial_cpus} CPU(s) each")
        from kiln.search.trial import run_trial

        # A fresh worker process per trial (max_calls=1): no memory or threads carried over.
        self.task = ray.remote(num_cpus=self.trial_cpus, max_retries=1, max_calls=1)(run_trial)

    def close(self):
        self.ray.shutdown()

    def _spec(self, number: int, recipe: str, workdir: Path, reference: dict | None) -> dict:
        s = self.settings
        return {"number": number, "model": s["model"], "recipe": recipe, "workdir": str(workdir.resolve()),
                "task": s["task"], "allow_pickle": s["allow_pickle"], "cache": os.environ.get("KILN_CACHE"),
                "threads": self.trial_cpus, "corpus": s["corpus"], "reference": reference,
                "max_size_mb": s["max_size_mb"], "max_ppl_increase": s["max_ppl_increase"], "min_cosine": s["min_cosine"]}

    def reference(self) -> dict:
        """The fp32 compile, measured like a trial (number -1), or its earlier record."""
        folder = self.output / "reference"
        saved = folder / "record.json"
        if saved.is_file():
            return json.loads(saved.read_text())
        folder.mkdir(exist_ok=True)
        self.say("reference: compiling the fp32 recipe (fills the export cache the trials share)")
        ref = self._get(self.task.remote(self._spec(-1, "fp32", folder, None)))
        if ref["status"] != "ok":
            raise SearchError(f"the reference (fp32) compile failed: {ref['reason']}")
        saved.write_text(json.dumps(ref, indent=2) + "\n")
        self.say(f"reference: {_summary(ref)}")
        return ref

    def _get(self, ref):
        """A task's record; a task Ray could not finish (its worker died twice, out of memory,
        cancelled) becomes a failed record."""
        try:
            return self.ray.get(ref)
        except (self.ray.exceptions.LocalRayletDiedError, self.ray.exceptions.RaySystemError) as exc:
            # The cluster itself is gone: no trial can run. The study keeps this trial as
            # running, so --resume runs it again.
            text = str(exc).strip().splitlines()
            raise SearchError(f"Ray stopped under the search ({type(exc).__name__}: {text[0] if text else ''}); "
                              f"the finished trials are kept: continue with --resume") from None
        except self.ray.exceptions.TaskCancelledError:
            return {"status": "failed", "reason": "cancelled"}
        except self.ray.exceptions.OutOfMemoryError:
            return {"status": "failed", "reason": "out of memory (Ray's memory monitor killed the worker)"}
        except self.ray.exceptions.RayError as exc:
            text = str(exc).strip().splitlines()
            return {"status": "failed", "reason": f"{type(exc).__name__}: {text[0] if text else ''}"[:300]}

    def optimise(self, optuna, tomli_w, plan: Space, trials: int, deadline: float | None) -> list[dict]:
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
        from optuna.trial import TrialState

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = JournalStorage(JournalFileBackend(str(self.output / "study.journal")))
        # Trials over a budget are told as infeasible (a constraint > 0) rather than pruned, so
        # that TPE learns to avoid what broke the budget.
        sampler = optuna.samplers.TPESampler(seed=self.settings["seed"], n_startup_trials=max(2, trials // 3))
        study = optuna.create_study(study_name="kiln-search", storage=storage, sampler=sampler,
                                    direction="minimize", load_if_exists=True)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            if t.state == TrialState.RUNNING:  # interrupted: rerun with the same choices
                study.enqueue_trial(t.params, skip_if_exists=False)
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        for folder in (self.output / "trials").glob("*"):
            if not (folder / "record.json").is_file():  # a trial the interruption cut short
                shutil.rmtree(folder)
        records = [json.loads(p.read_text()) for p in sorted((self.output / "trials").glob("*/record.json"))]
        seen = {json.dumps(r["params"], sort_keys=True): r for r in records}
        pending, duplicates = {}, 0
        done = sum(r.get("duplicate_of") is None for r in records)  # --trials counts distinct recipes
        while True:
            out_of_time = deadline is not None and time.monotonic() > deadline
            while not out_of_time and len(pending) < self.slots and done + len(pending) < trials \
                    and duplicates < DUPLICATES_BEFORE_STOP:
                trial = study.ask()
                params = plan.suggest(trial)
                key = json.dumps(params, sort_keys=True)
                if key in seen:  # the sampler asked again for a recipe already measured
                    duplicates += 1
                    record = dict(seen[key], number=trial.number, duplicate_of=seen[key]["number"])
                    self._finish(study, trial, record, tomli_w, plan)
                    records.append(record)
                    continue
                duplicates = 0
                folder = self.output / "trials" / f"{trial.number:04d}"
                folder.mkdir(parents=True, exist_ok=True)
                recipe = plan.recipe(params, f"trial-{trial.number}")
                (folder / "recipe.toml").write_text(tomli_w.dumps(recipe))
                ref = self.task.remote(self._spec(trial.number, str((folder / "recipe.toml").resolve()), folder,
                                                  self._reference_record()))
                pending[ref] = (trial, params, time.monotonic())
                self.say(f"trial {trial.number}: started ({describe(params)})")
            if not pending:
                break
            ready, _ = self.ray.wait(list(pending), num_returns=1, timeout=2.0)
            now, cancelled = time.monotonic(), {}
            for ref, (trial, params, began) in list(pending.items()):
                if ref in ready:
                    continue
                if out_of_time:
                    cancelled[ref] = "budget"
                elif self.timeout_s is not None and now - began > self.timeout_s:
                    cancelled[ref] = f"over the trial time limit of {self.timeout_s:g} s"
                if ref in cancelled:
                    self.ray.cancel(ref, force=True)
                    ready.append(ref)
            for ref in ready:
                trial, params, began = pending.pop(ref)
                record = self._get(ref)
                if ref in cancelled and record["status"] == "failed":  # not one that finished meanwhile
                    if cancelled[ref] == "budget":  # left running in the study: --resume runs it again
                        shutil.rmtree(self.output / "trials" / f"{trial.number:04d}", ignore_errors=True)
                        self.say(f"trial {trial.number}: stopped by the search's time budget (--resume runs it again)")
                        continue
                    record["reason"] = cancelled[ref]
                record.setdefault("number", trial.number)
                record["params"] = params
                record.setdefault("seconds", {})["wall"] = round(time.monotonic() - began, 1)
                self._finish(study, trial, record, tomli_w, plan)
                records.append(record)
                seen[json.dumps(params, sort_keys=True)] = record  # a compile is deterministic: so is its failure
                done += 1
        return sorted(records, key=lambda r: r["number"])

    def _reference_record(self) -> dict:
        return json.loads((self.output / "reference" / "record.json").read_text())

    def _finish(self, study, trial, record: dict, tomli_w, plan: Space) -> None:
        folder = self.output / "trials" / f"{trial.number:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "recipe.toml").exists():
            (folder / "recipe.toml").write_text(tomli_w.dumps(plan.recipe(record["params"], f"trial-{trial.number}")))
        (folder / "record.json").write_text(json.dumps(record, indent=2) + "\n")
        if record["status"] == "ok":
            trial.set_constraint("budget", 0.0)
            study.tell(trial, _objective_value(record, self.settings["objective"]))
        else:  # over a budget, or failed: TPE learns to avoid both (a failure the more)
            trial.set_constraint("budget", 1.0 if record["status"] == "pruned" else 2.0)
            study.tell(trial, INFEASIBLE)
        if record.get("duplicate_of") is not None:
            self.say(f"trial {trial.number}: the recipe of trial {record['duplicate_of']} again: its record reused")
            return
        where = f" on node {record['node'][:8]}" if record.get("node") else ""
        self.say(f"trial {trial.number}: {record['status']}{where}: " + (
            _summary(record) if record["status"] == "ok" else record.get("reason") or ""))


def _summary(record: dict) -> str:
    parts = [f"{record['size_mb']:.1f} MB"] if record.get("size_mb") is not None else []
    quality = record.get("quality") or {}
    if "ppl_increase" in quality:
        parts.append(f"perplexity {quality['perplexity']:.3f} ({quality['ppl_increase']:+.2%})")
    if "cosine_mean" in quality:
        parts.append(f"cosine {quality['cosine_mean']:.4f}")
    if record.get("speed") and record.get("task"):
        parts.append(f"speed {_speed(record):g}")
    return ", ".join(parts)


__all__ = ["SearchError", "SpaceError", "search"]
