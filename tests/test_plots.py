"""What the pictures draw, read from the figure itself (kd.plots saves what it draws; here the figure is kept)."""
import pytest

import kd.plots as kplots


@pytest.fixture
def drawn(monkeypatch):
    figures = []
    monkeypatch.setattr(kplots, "save_figure", lambda fig, path: figures.append(fig))
    return figures


def test_soft_and_hard_losses_never_share_an_axis(drawn, tmp_path):
    """Soft mode's loss (KL to softened probabilities, times T^2, plus cross-entropy) and hard mode's (cross-entropy
    to the teacher's labels) are different sums: each mode gets its loss panel; a run keeps its colour across them."""
    def history(scale):
        return [{"epoch": e, "train_loss": scale / e, "val_auc": 0.8 + e / 100} for e in (1, 2, 3)]
    kplots.learning_curves({"a": history(0.5), "b": history(1.4), "c": history(0.4)}, tmp_path / "curves.png",
                           metric="val_auc", losses={"a": "soft", "b": "hard", "c": "soft"})
    loss_soft, loss_hard, metric = drawn[0].axes
    assert [ax.get_title() for ax in drawn[0].axes] == ["training loss, soft mode", "training loss, hard mode",
                                                       "validation AUC"]
    assert [line.get_label() for line in loss_soft.lines] == ["a", "c"]
    assert [line.get_label() for line in loss_hard.lines] == ["b"]
    colours = {line.get_label(): line.get_color() for line in metric.lines}
    assert loss_soft.lines[1].get_color() == colours["c"] and loss_hard.lines[0].get_color() == colours["b"]
    assert len(set(colours.values())) == 3

    kplots.learning_curves({"a": history(0.5)}, tmp_path / "one.png", metric="val_auc")  # one run: one loss panel
    assert [ax.get_title() for ax in drawn[1].axes] == ["training loss", "validation AUC"]


@pytest.mark.slow
def test_the_exported_trial_is_starred_in_every_picture_of_its_trials(drawn, monkeypatch, shared_search):
    """params.png and pareto.png star the exported trial's point; timeline.png names it."""
    import search.plots as splots
    from search.run import Run
    monkeypatch.setattr(splots, "save_figure", lambda fig, path: drawn.append(fig))
    run = Run(shared_search[1], refresh=False)
    row = run.table[run.table["trial"] == run.best.trial].iloc[0]
    metric = run.config.search.metric

    def starred(ax):  # the points drawn at the star's size
        return [tuple(c.get_offsets()[0]) for c in ax.collections if list(c.get_sizes()) == [200]]

    splots.params_vs_metric(run, shared_search[1] / "unused.png")
    panels = {ax.get_title(): ax for ax in drawn[-1].axes}
    assert starred(panels["train.lr"]) == [(pytest.approx(row["train.lr"]), pytest.approx(row[metric]))]
    assert f"exported ({run.best.trial})" in [t.get_text() for t in drawn[-1].legends[0].get_texts()]
    splots.pareto(run, shared_search[1] / "unused.png")
    assert all(starred(ax) == [(pytest.approx(row[cost]), pytest.approx(row[metric]))]
               for ax, cost in zip(drawn[-1].axes, ("student_latency_ms", "student_params"), strict=True))
    splots.timeline(run, shared_search[1] / "unused.png")
    assert sum(f"{run.best.trial} (exported)" in t.get_text() for t in drawn[-1].axes[0].texts) == 1
