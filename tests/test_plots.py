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
