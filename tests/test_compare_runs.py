"""The run comparison reads the CSV log and train.log's clock of a run directory."""

import pytest

from vdvae import compare_runs


def fake_run(path, minutes, test_bpd):
    (path / "csv" / "version_0").mkdir(parents=True)
    rows = ["epoch,step,train/bpd,val/bpd", "0,49,5.0,", "0,99,4.0,", "0,99,,3.9"]
    (path / "csv" / "version_0" / "metrics.csv").write_text("\n".join(rows) + "\n")
    (path / "train.log").write_text(
        "[2026-11-29 07:00:00,001][x][INFO] - Seed set to 0\n"
        f"[2026-11-29 07:{minutes:02d}:30,000][x][INFO] - `Trainer.fit` stopped: `max_steps=100` reached.\n"
        f"[2026-11-29 07:59:00,000][vdvae.tasks.train][INFO] - test: {test_bpd} bits/dim (ELBO, 10000 images)\n"
    )
    return path


def test_minutes_curves_and_test_figure_of_a_run(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a", 10, 3.5), fake_run(tmp_path / "b", 20, 3.4)
    assert compare_runs.training_minutes(a) == 10.5  # to the end of training, not of testing
    assert compare_runs.curves(a) == {"train/bpd": [(49, 5.0), (99, 4.0)], "val/bpd": [(99, 3.9)]}
    compare_runs.main([str(a), str(b), "--labels", "A", "B", "--out", str(tmp_path / "plot.png")])
    table = capsys.readouterr().out
    assert "A" in table and "3.5000" in table and "3.4000" in table and "20.5" in table
    assert (tmp_path / "plot.png").stat().st_size > 1000


def test_the_gap_between_two_curves_counts_the_steps_both_logged():
    # Steps 2 and 3 are shared: |4.0 - 4.5| and |3.0 - 2.0| average to 0.75; steps 1 and 4 are not counted.
    assert compare_runs.mean_gap([(1, 5.0), (2, 4.0), (3, 3.0)], [(2, 4.5), (3, 2.0), (4, 9.0)]) == 0.75


def test_a_run_shorter_than_its_logging_interval_compares_and_a_wandb_only_run_is_refused(tmp_path, capsys):
    short = fake_run(tmp_path / "short", 1, 4.1)
    (short / "csv" / "version_0" / "metrics.csv").write_text("epoch,step,train/bpd,val/bpd\n0,19,,4.2\n")
    compare_runs.main([str(short), "--out", str(tmp_path / "plot.png")])
    assert "4.2000" in capsys.readouterr().out
    wandb_only = tmp_path / "wandb_only"
    (wandb_only / "wandb").mkdir(parents=True)
    with pytest.raises(SystemExit) as stop:
        compare_runs.main([str(short), str(wandb_only), "--out", str(tmp_path / "plot.png")])
    error = capsys.readouterr().err
    assert stop.value.code == 1 and error.count("\n") == 1 and "logger=csv" in error, error
