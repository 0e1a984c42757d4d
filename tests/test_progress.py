"""The bar over a run's layers: counts, an ETA from trained layers only, the same line in the log file."""

from __future__ import annotations

import logging

from hh_lightning.pipeline import LayerProgress, format_duration


def fake_clock(times):
    iterator = iter(times)
    return lambda: next(iterator)


def test_eta_averages_the_trained_layers_and_ignores_skipped_ones(tmp_path, caplog) -> None:
    # Start at 0; layer 0 skipped (0.5 s), layers 1 and 2 trained in 10 and 20 s; 3 of 5 layers left after 2.
    progress = LayerProgress(5, tmp_path / "logs" / "progress.log", width=10,
                             clock=fake_clock([0.0, 0.5, 10.5, 30.5]))
    with caplog.at_level(logging.INFO, logger="hh_lightning.pipeline"):
        first = progress.update(0, trained=False)
        progress.update(1, trained=True)
        third = progress.update(2, trained=True)
    assert first == "layers [##........] 1/5 (layer 0 done), ETA unknown (no layer trained yet)"
    assert third == "layers [######....] 3/5 (layer 2 done), 15.0 s/layer, ETA 30 s"
    assert [r.getMessage() for r in caplog.records][-1] == third
    logged = (tmp_path / "logs" / "progress.log").read_text().splitlines()
    assert len(logged) == 3 and logged[-1].endswith(third)


def test_a_finished_run_shows_a_full_bar_and_no_time_left() -> None:
    progress = LayerProgress(2, clock=fake_clock([0.0, 3.0, 6.0]))
    progress.update(0, trained=True)
    assert progress.update(1, trained=True) == "layers [####################] 2/2 (layer 1 done), 3.0 s/layer, ETA 0 s"


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.4, 59, 75, 3599, 4000)] == ["0 s", "59 s", "1 min 15 s", "59 min 59 s",
                                                                       "1 h 6 min"]
