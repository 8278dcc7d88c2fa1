"""The W&B dashboard of a project, as code: `vdvae-dashboard <entity>/<project>` saves a workspace view
(wandb-workspaces, the `dashboard` extra) with bits/dim curves (train, val, test), rate and distortion, the
KL of every latent group over steps, the learning rate, gradient norm and skipped updates, the latest
sample and reconstruction grids, and for sweeps a parallel-coordinates panel and the parameters'
importance for val/bpd.

Its panels name the keys training logs. `vdvae-dashboard --check <run folder>` reads a run's offline W&B
files (no network) and lists any panel key the run did not log; the tests run it on a real run, so that a
renamed metric fails a test, not the dashboard.
"""

import argparse
import re
import struct
import warnings
from pathlib import Path

from vdvae.errors import refuse

# (section, panel title, keys): a key is a metric's name, or a regular expression (`re:`) for a family of
# them (one per latent group, the optimizer's learning rate). Images are logged media; config keys (`c:`)
# are the run's configuration.
LINES = [
    ("bits per dim", "bits/dim", ["train/bpd", "val/bpd", "test/bpd"]),
    ("bits per dim", "rate (KL, nats per dim)", ["train/rate", "val/rate"]),
    ("bits per dim", "distortion (nats per dim)", ["train/distortion", "val/distortion"]),
    ("latent groups", "val KL per group (nats per image)", ["re:val/kl/group_\\d+"]),
    ("optimisation", "learning rate", ["re:lr-.*"]),
    ("optimisation", "gradient norm", ["train/grad_norm"]),
    ("optimisation", "skipped updates", ["train/skipped_total", "train/skip_rate"]),
]
IMAGES = ("images", ["val/samples_t1", "val/samples_t0.8", "val/samples_t0", "val/reconstructions"])
SWEEP_COLUMNS = ["c:model.lr", "c:data.batch_size", "c:seed", "val/bpd"]
OBJECTIVE = "val/bpd"


def panel_keys() -> list[str]:
    """Every key the dashboard's panels name."""
    return [k for _, _, keys in LINES for k in keys] + IMAGES[1] + SWEEP_COLUMNS + [OBJECTIVE]


def workspace(entity: str, project: str, name: str):
    """The workspace view (not saved)."""
    with warnings.catch_warnings():  # its pydantic v1 validators: nothing a user can act on
        warnings.simplefilter("ignore", DeprecationWarning)
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws

    def line(title, keys):
        regex = [k[3:] for k in keys if k.startswith("re:")]
        return wr.LinePlot(title=title, x="trainer/global_step", y=[k for k in keys if not k.startswith("re:")],
                           metric_regex=regex[0] if regex else None)

    sections = {}
    for section, title, keys in LINES:
        sections.setdefault(section, []).append(line(title, keys))
    sections[IMAGES[0]] = [wr.MediaBrowser(title="latest grids", media_keys=IMAGES[1], num_columns=len(IMAGES[1]))]
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k[2:]) if k.startswith("c:") else wr.SummaryMetric(k))
               for k in SWEEP_COLUMNS]
    sections["sweeps"] = [
        wr.ParallelCoordinatesPlot(title="hyperparameters and val/bpd", columns=columns),
        wr.ParameterImportancePlot(with_respect_to=OBJECTIVE),
    ]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=[ws.Section(name=title, panels=panels, is_open=True) for title, panels in sections.items()],
    )


def offline_records(run_dir: Path) -> list:
    """The records (wandb's protobuf) of every offline W&B run under `run_dir`: its `.wandb` files are a
    LevelDB-style log (a 7-byte header, then 32 KiB blocks of checksummed, typed chunks)."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted(Path(run_dir).glob("**/offline-run-*/run-*.wandb")):
        data, position, pending = path.read_bytes(), 7, b""
        while position + 7 <= len(data):
            left = 32768 - position % 32768
            _, length, kind = struct.unpack("<IHB", data[position : position + 7])
            if left < 7 or (length == 0 and kind == 0):  # the block's zero padding
                position += left
                continue
            pending += data[position + 7 : position + 7 + length]
            position += 7 + length
            if kind in (1, 4):  # a whole record, or its last chunk
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def logged_keys(run_dir: Path) -> tuple[set[str], set[str]]:
    """The history keys and config keys (flattened with dots) of the offline W&B runs under `run_dir`."""
    import json

    history, config = set(), set()
    for record in offline_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {item.key or item.nested_key[0] for item in record.history.item}
        elif kind == "config":
            for item in record.config.update:
                config |= {item.key, *_flattened(item.key, json.loads(item.value_json))}
    return history, config


def _flattened(prefix: str, value) -> list[str]:
    if not isinstance(value, dict):
        return []
    return [k for key, v in value.items() for k in (f"{prefix}.{key}", *_flattened(f"{prefix}.{key}", v))]


def missing_keys(run_dir: Path) -> list[str]:
    """The panel keys that the offline W&B runs under `run_dir` did not log."""
    history, config = logged_keys(run_dir)
    missing = []
    for key in panel_keys():
        if key.startswith("c:"):
            found = key[2:] in config
        elif key.startswith("re:"):
            found = any(re.fullmatch(key[3:], k) for k in history)
        else:
            found = key in history
        if not found:
            missing.append(key)
    return missing


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("project", nargs="?", help="entity/project of the W&B runs")
    parser.add_argument("--name", default="vdvae", help="the view's name")
    parser.add_argument("--check", type=Path, metavar="RUN", help="list the panel keys a run's offline files lack")
    args = parser.parse_args(argv)
    if args.check:
        if not offline_records(args.check):
            refuse(f"{args.check}: no offline W&B run in it (wandb/offline-run-*/run-*.wandb)")
        missing = missing_keys(args.check)
        print("every panel's key is logged" if not missing else "not logged: " + ", ".join(missing))
        raise SystemExit(1 if missing else 0)
    if not args.project or args.project.count("/") != 1:
        refuse("name the W&B project as entity/project (e.g. vdvae-dashboard my-team/vdvae)")
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        refuse("vdvae-dashboard needs the dashboard extra: pip install '.[dashboard]'")
    from vdvae.loggers import wandb_credentials

    if not wandb_credentials():
        refuse("saving a W&B workspace needs a W&B account: run `wandb login` (and network) first")
    entity, project = args.project.split("/")
    view = workspace(entity, project, args.name).save()
    print(f"saved {view.url}")


if __name__ == "__main__":
    main()
