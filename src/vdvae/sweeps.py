"""What a sweep's jobs did, and the table that says it.

Every job of a multirun records itself in `<job dir>/job.json` (`JobRecord`, a Hydra callback that runs
in the job's own process, whatever the launcher): "running" as it starts, then its overrides, its status,
its objective, its best val/bpd, its steps and its wall time. The status is one of

    completed   trained and returned a finite objective
    diverged    its metrics are NaN or infinite (`RunDiverged`)
    stalled     the stall guard stopped it: every update in a row was skipped (`TrainingStalled`)
    crashed     any other failure, or none recorded: the job was killed outside Python

At the end of the sweep `SweepSummary` (a Hydra callback too) gathers the records into `summary.md` and
`summary.csv` in the sweep's folder, logs the table, sends it to W&B as a summary run where W&B is the
logger (an Optuna study adds its best trial and the parameters' importances, `NOTES`), and ends the sweep
with exit status 1 if a job failed.
"""

import csv
import io
import json
import logging
import math
import os
import shlex
import statistics
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf

from vdvae import run_folder
from vdvae.config import SWEEP_CHOICES, is_worker_process
from vdvae.errors import RunDiverged, TrainingStalled, one_line, refuse
from vdvae.files import write_atomically

log = logging.getLogger(__name__)

RECORD = "job.json"
# What the running job has reported so far (vdvae.tasks.train fills it in as it goes).
REPORTED: dict = {}


def resume_hint(run_dir: Path | None, overrides=(), cluster=()) -> str:
    """The command that resumes the run in `run_dir` (made with `overrides`) from its last.ckpt: in place,
    or with `cluster` (`-m` and a launcher's overrides) as a job of that cluster, where the run needs one
    (several nodes); or that it saved none yet."""
    if run_dir is None:
        return "its last.ckpt resumes it"
    last = run_folder.last_checkpoint(run_dir)
    if not last.is_file():
        return f"no checkpoint yet in {last.parent}"
    if cluster:  # a sweep command: not one that starts a study again (an Optuna trial's hparams_search)
        overrides = [o for o in overrides if str(o).split("=")[0].lstrip("+~") not in SWEEP_CHOICES]
    return "resume it: " + shlex.join(["python", "train.py", *cluster, *overrides, f"ckpt_path={last}"])


def report(**values):
    """Note values of the running job (steps, best_val_bpd, objective) for its record."""
    REPORTED.update(values)


def status_of(error: BaseException | None) -> str:
    if error is None:
        return "completed"
    if isinstance(error, RunDiverged):
        return "diverged"
    if isinstance(error, TrainingStalled):
        return "stalled"
    return "crashed"


def make_record(job: str, overrides, error: BaseException | None, **measured) -> dict:
    """A job's record: its name, overrides, status (from how it failed, if it did), what it measured, and
    its error in one line."""
    return {
        "job": job,
        "overrides": list(overrides or []),
        "status": status_of(error),
        **measured,
        "error": one_line(error, 4000) if error is not None else None,  # (room for a resume command)
    }


def _finite_or_none(value):
    return float(value) if value is not None and math.isfinite(float(value)) else None


class JobRecord(Callback):
    """Writes `job.json` into each multirun job's directory: "running" as the job starts, what it did as it
    ends. A job that fails does so alone: the run lifecycle notes its error here (`report(error=...)`) and
    the job returns, so that the sweep goes on."""

    def on_job_start(self, config, **kwargs):
        global _recording
        REPORTED.clear()
        self._started = time.monotonic()
        out = Path(str(config.hydra.runtime.output_dir))
        # Not in a folder that is not this job's (vdvae.lifecycle.RunDirGuard refused it): its record is another's.
        _recording = HydraConfig.get().mode == RunMode.MULTIRUN and not is_worker_process() and run_folder.owns(out)
        if _recording:
            started = make_record(out.name, config.hydra.overrides.task, None, num=config.hydra.job.num)
            write_record(out, {**started, "status": "running"})

    def on_job_end(self, config, job_return, **kwargs):
        global _recording
        out, recording, _recording = Path(str(config.hydra.runtime.output_dir)), _recording, False
        if not recording or not out.is_dir():
            return
        error = REPORTED.get("error") or (job_return._return_value if job_return.status.name == "FAILED" else None)
        record = make_record(
            out.name,
            job_return.overrides,
            error,
            num=config.hydra.job.num,
            objective=_finite_or_none(REPORTED.get("objective")),
            best_val_bpd=_finite_or_none(REPORTED.get("best_val_bpd")),
            test_bpd=_finite_or_none(REPORTED.get("test_bpd")),
            steps=REPORTED.get("steps"),
            seconds=round(time.monotonic() - self._started, 1),
        )
        write_record(out, record)
        if error is not None:
            log.error("job %s %s: %s", record["job"], record["status"], record["error"])


# Whether this process runs a sweep job that JobRecord records (its failure is then the job's alone).
_recording = False


def recording() -> bool:
    return _recording


def write_record(job_dir: Path, record: dict):
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    (Path(job_dir) / RECORD).write_text(json.dumps(record, indent=1))


def sweep_records(sweep_dir: Path) -> list[dict]:
    """The records of the jobs in `sweep_dir`, in the order they were started; a job whose record still says
    "running" died without writing its end (killed outside Python): crashed, with how to resume it."""
    records = []
    for folder in sorted(Path(sweep_dir).iterdir()) if Path(sweep_dir).is_dir() else []:
        record = read_record(folder)
        if record is None:
            continue
        if record["status"] == "running":
            hint = resume_hint(folder, record["overrides"])
            record.update(status="crashed", error=f"the job ended without a record of its end (killed?); {hint}")
        records.append(record)
    return sorted(records, key=lambda r: (r.get("num") is None, r.get("num") or 0, r["job"]))


# What a sweeper adds below the table of its sweep (an Optuna study: its best trial, the importances), and
# the values it adds to the sweep's W&B summary run.
NOTES: list[str] = []
SUMMARY_VALUES: dict = {}


class SweepSummary(Callback):
    """At the end of a sweep: `summary.md` and `summary.csv` of its jobs' records, the table in the log and
    in W&B; a sweep with a failed job exits non-zero, in one line."""

    def on_multirun_start(self, config, **kwargs):
        NOTES.clear()
        SUMMARY_VALUES.clear()
        from vdvae.loggers import SWEPT_KEYS  # here: loggers import Lightning, which a refusal need not wait for

        os.environ[SWEPT_KEYS] = ",".join(swept_keys(config))  # the jobs' W&B names

    def on_multirun_end(self, config, **kwargs):
        sweep_dir = Path(str(config.hydra.sweep.dir))
        records = sweep_records(sweep_dir)
        if not records:
            return
        summary = write_summary(sweep_dir, records, "\n".join(NOTES), config)
        failed = [r for r in records if r["status"] != "completed"]
        if failed:
            kinds = ", ".join(
                f"{s}: {sum(r['status'] == s for r in failed)}" for s in sorted({r["status"] for r in failed})
            )
            refuse(f"{len(failed)} of {len(records)} jobs failed ({kinds}): see {summary}")


def swept_keys(config) -> list[str]:
    """The keys a sweep varies: its command's sweep overrides (`a=1,2`, `choice(...)`, ...) and its sweeper's
    search space (`hydra.sweeper.params`, Optuna's)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    return sorted({o.key_or_group for o in overrides if o.is_sweep_override()} | set(params))


def read_record(job_dir: Path) -> dict | None:
    """The record a job left in its directory, or None."""
    try:
        return json.loads((Path(job_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None


COLUMNS = ["job", "trial", "overrides", "status", "objective", "best_val_bpd", "test_bpd", "steps", "seconds"]
# The columns of a sweep's values that seeds_summary averages over seeds.
MEASURED = ["objective", "best_val_bpd", "test_bpd"]


def _varying(records: list[dict]) -> set[str]:
    """The override keys whose values differ between jobs (all of them for a single job)."""
    values: dict[str, set] = {}
    for record in records:
        for override in record.get("overrides") or []:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    missing = {k for k in values if any(k not in _keys(r) for r in records)}
    return {k for k, v in values.items() if len(v) > 1 or k in missing} if len(records) > 1 else set(values)


def _keys(record) -> set[str]:
    return {o.partition("=")[0] for o in record.get("overrides") or []}


def _cell(record, column, varying=None):
    value = record.get(column)
    if column == "overrides":
        return " ".join(o for o in value or [] if varying is None or o.partition("=")[0] in varying)
    if isinstance(value, float):
        return f"{value:.4f}" if column != "seconds" else f"{value:.0f}"
    return "" if value is None else str(value)


def _markdown(text: str) -> str:
    """A table cell's text that stays in its cell: one line, its bars escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _spreadsheet(value):
    """A CSV cell a spreadsheet shows as text, never runs as a formula (`=`, `+`, `-`, `@` first)."""
    return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _columns(records: list[dict]) -> list[str]:
    """COLUMNS, less trial (Optuna's) and test_bpd where no job has one."""
    return [c for c in COLUMNS if c not in ("trial", "test_bpd") or any(r.get(c) is not None for r in records)]


def seeds_summary(records: list[dict]) -> str:
    """Mean ± standard deviation (n - 1) of each measured value over the completed jobs whose overrides differ
    only in `seed`, a line per such group of two jobs or more; "" where there is none."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        if record["status"] == "completed":
            rest = tuple(sorted(o for o in record.get("overrides") or [] if o.partition("=")[0] != "seed"))
            groups.setdefault(rest, []).append(record)
    lines = []
    for rest, group in groups.items():
        if len(group) < 2 or len({_seed(r) for r in group}) < len(group):
            continue
        stats = []
        for column in MEASURED:
            values = [r[column] for r in group if r.get(column) is not None]
            if len(values) == len(group):
                stats.append(f"{column} {statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}")
        if stats:
            what = " ".join(o for o in rest if o.partition("=")[0] in _varying(records)) or "all jobs"
            lines.append(f"- {_markdown(what)}, {len(group)} seeds: " + ", ".join(stats))
    return "\n".join(["over seeds (mean ± std):", *lines]) if lines else ""


def _seed(record) -> str | None:
    return next((o.partition("=")[2] for o in record.get("overrides") or [] if o.partition("=")[0] == "seed"), None)


def table(records: list[dict]) -> str:
    """A Markdown table, one row per job (with the overrides that differ between jobs), and each failure."""
    columns, varying = _columns(records), _varying(records)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_markdown(_cell(r, c, varying)) for c in columns) + " |" for r in records]
    failures = [
        f"- job {_markdown(str(r['job']))} {_markdown(str(r['status']))}: {_markdown(str(r.get('error') or ''))}"
        for r in records
        if r["status"] != "completed"
    ]
    return "\n".join(lines + ([""] + failures if failures else []))


def write_summary(sweep_dir, records: list[dict], extra: str = "", config=None) -> Path:
    """summary.md and summary.csv in the sweep's folder, the table in the log, and a W&B summary run."""
    sweep_dir = Path(sweep_dir)
    failed = [r for r in records if r["status"] != "completed"]
    seeds = seeds_summary(records)
    text = f"{table(records)}\n\n{len(records) - len(failed)} of {len(records)} jobs completed\n"
    text = (text + (f"\n{seeds}\n" if seeds else "") + extra).rstrip() + "\n"
    write_atomically(sweep_dir / "summary.md", text)
    with io.StringIO() as buffer:
        writer = csv.DictWriter(buffer, [*_columns(records), "error"], extrasaction="ignore")
        writer.writeheader()
        for r in records:
            writer.writerow(
                {k: _spreadsheet(v) for k, v in {**r, "overrides": " ".join(r.get("overrides") or [])}.items()}
            )
        write_atomically(sweep_dir / "summary.csv", buffer.getvalue())
    log.info("sweep summary (%s):\n%s", sweep_dir / "summary.md", text)
    if config is not None:
        _to_wandb(sweep_dir, records, config)
    return sweep_dir / "summary.md"


def _to_wandb(sweep_dir: Path, records: list[dict], config):
    """The table as a W&B run of its own (group: the sweep folder's name), where W&B is the logger."""
    from omegaconf import OmegaConf

    wandb_config = OmegaConf.select(config, "logger.wandb", default=None)
    if wandb_config is None:
        return
    import wandb

    from vdvae.loggers import wandb_mode

    run = wandb.init(
        project=wandb_config.get("project"),
        entity=wandb_config.get("entity"),
        dir=str(sweep_dir),
        mode=wandb_mode(wandb_config.get("mode")),
        name=f"{sweep_dir.name}-summary",
        group=sweep_dir.name,
        job_type="sweep-summary",
        reinit="finish_previous",  # (a run of this process still open is finished first)
    )
    columns = [*_columns(records), "error"]
    run.log({"sweep/summary": wandb.Table(columns=columns, data=[[_cell(r, c) for c in columns] for r in records])})
    run.summary.update(SUMMARY_VALUES)  # an Optuna study's best value and parameter importances
    importances = [[k.partition("/")[2], v] for k, v in SUMMARY_VALUES.items() if k.startswith("importance/")]
    if importances:
        run.log({"sweep/importances": wandb.Table(columns=["parameter", "importance"], data=importances)})
    run.finish()
