"""The W&B dashboard as code, against what a real run logs: a tiny run and its evaluation with W&B offline,
read back from their offline run files. A renamed metric fails here, not on the dashboard."""

import pytest

from tests.run_helpers import TINY_RUN, job_config, run_in_process
from vdvae import dashboard


def runs_of(folder):
    return [r.run for r in dashboard.offline_records(folder) if r.WhichOneof("record_type") == "run"]


def test_every_panel_key_is_one_a_real_run_logs_and_an_eval_joins_its_runs_group(tmp_path, monkeypatch, capsys):
    import wandb

    from vdvae.tasks.eval import evaluate

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "2026-12-07_10-00-00_abcdef"
    run_in_process(run, *[o for o in TINY_RUN if o != "logger=csv"], "logger=wandb", "trainer.max_steps=60")
    wandb.finish()
    assert dashboard.missing_keys(run) == []
    (trained,) = runs_of(run)
    assert (trained.run_group, trained.display_name, trained.job_type) == (run.name, run.name, "train")
    metrics = [r.metric for r in dashboard.offline_records(run) if r.WhichOneof("record_type") == "metric"]
    assert any(m.name == "val/bpd" and m.summary.min for m in metrics)  # the best val/bpd in the summary

    evaluate(job_config(tmp_path / "eval", "eval", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer=cpu"))
    wandb.finish()
    (scored,) = runs_of(tmp_path / "eval")
    assert (scored.run_group, scored.job_type) == (run.name, "eval")
    _, config = dashboard.logged_keys(tmp_path / "eval")
    assert {"ckpt_path", "iw_samples", "step", "trained_wandb_run"} <= config

    # sample.py and compress.py log the same way, with what they made (a figure; compress's report).
    from vdvae.loggers import log_request
    from vdvae.tasks.compress import compress
    from vdvae.tasks.sample import sample

    ckpt = f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    for task, recipe, options in (("sample", sample, ["mode=samples", "n=4"]), ("compress", compress, ["n_images=4"])):
        cfg = job_config(tmp_path / task, task, ckpt, *options)
        log_request(cfg, recipe(cfg))
        wandb.finish()
        (made,) = runs_of(tmp_path / task)
        assert (made.run_group, made.job_type) == (run.name, task)
        history, config = dashboard.logged_keys(tmp_path / task)
        assert {"ckpt_path", "trained_wandb_run"} <= config
        assert ("sample/samples_t1" if task == "sample" else "compress/net_bits_per_dim") in history, history

    with pytest.raises(SystemExit) as done:
        dashboard.main(["--check", str(run)])
    assert done.value.code == 0 and capsys.readouterr().out.endswith("every panel's key is logged\n")


def test_a_renamed_metric_is_reported_missing_and_the_view_names_the_panel_keys(monkeypatch):
    monkeypatch.setattr(dashboard, "logged_keys", lambda run: ({"train/bpd", "val/kl/group_00"}, {"model.lr"}))
    missing = dashboard.missing_keys("run")
    assert "val/bpd" in missing and "re:val/kl/group_\\d+" not in missing and "c:model.lr" not in missing
    view = dashboard.workspace("team", "vdvae", "vdvae")
    panels = [p for section in view.sections for p in section.panels]
    named = {k for p in panels for k in getattr(p, "y", [])} | {k for p in panels for k in getattr(p, "media_keys", [])}
    assert {"train/bpd", "val/bpd", "test/bpd", "val/samples_t1", "train/grad_norm"} <= named
    assert [s.name for s in view.sections] == ["bits per dim", "latent groups", "optimisation", "images", "sweeps"]


@pytest.mark.parametrize("argv, error", [(["vdvae"], "entity/project"), (["--check", "."], "no offline W&B run")])
def test_the_command_refuses_in_one_line(argv, error, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        dashboard.main(argv)
    assert done.value.code == 1 and error in capsys.readouterr().err


def test_a_checkpoints_wandb_run_id_and_group_are_used_only_in_their_form(caplog):
    from vdvae.loggers import recorded

    assert recorded({"wandb_run_id": "5jxwfsr0"}, "wandb_run_id") == "5jxwfsr0"
    assert recorded({"wandb_group": "lr sweep 2"}, "wandb_group") == "lr sweep 2"
    assert recorded({}, "wandb_group") is None
    crafted = [("wandb_run_id", "../x"), ("wandb_run_id", 5), ("wandb_group", "x" * 10_000), ("wandb_group", "a\nb")]
    for key, value in crafted:
        assert recorded({key: value}, key) is None
    assert caplog.text.count("is not one;") == 4 and "a new W&B run is started" in caplog.text
    assert len(caplog.text) < 4000  # a crafted value is quoted cut
