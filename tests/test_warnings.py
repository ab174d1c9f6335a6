"""The warnings a user must not miss (search.warnings), from the records a search writes."""
import math

from kd.teacher import TeacherInfo
from search.records import LabelsOnly, TeacherRecord, Verdict
from search.warnings import at_chance, never_predicted, teacher_warning, twin_warning


def teachers(*confusions):
    return TeacherRecord(metrics={}, info=TeacherInfo("k", "test_resnet"), teachers=len(confusions),
                         each=[{"balanced_accuracy": (cm[0][0] / sum(cm[0]) + cm[1][1] / sum(cm[1])) / 2,
                                "confusion_matrix": cm} for cm in confusions])


def test_teachers_at_chance_on_every_fold_are_named_with_what_to_try():
    chance = [[16, 4], [4, 1]]      # 5 rare images, one found: 0.5, and 5 images cannot tell it from chance
    never = [[20, 0], [5, 0]]       # calls everything the majority
    good = [[19, 1], [0, 5]]
    assert at_chance(chance) and at_chance(never) and not at_chance(good)
    assert not at_chance([[900, 100], [100, 900]]) and at_chance([[500, 500], [500, 500]])
    (said,) = teacher_warning(teachers(chance, never))
    assert said.startswith("every one of the 2 teachers is at chance") and "0.50, 0.50" in said
    assert all(key in said for key in ("teacher.train.epochs", "teacher.pretrained", "data.image_size"))
    assert teacher_warning(teachers(chance, good)) == []  # one fold teacher learned: no warning
    assert teacher_warning(None) == []


def test_a_class_the_shipped_model_never_predicts_is_named_where_it_happened():
    test = {"confusion_matrix": [[279, 0], [21, 0]]}
    said = never_predicted(["nonface", "face"], [0.9, 0.1], test, "the exported refit")
    assert said == ["the exported refit never predicts face on the test split: it has not learned that class, "
                    "whatever its accuracy"]
    both = never_predicted(["nonface", "face"], [1.0, 0.0], test, "the exported refit")
    assert len(both) == 2 and "on the held-out predictions its rule was chosen on" in both[0]
    assert never_predicted(["a", "b"], [0.8, 0.2], {"confusion_matrix": [[8, 2], [1, 4]]}, "it") == []


def test_a_winner_that_does_not_beat_its_labels_only_twin_is_said():
    common = dict(trial="abc", seeds=[4, 5], values=[0.9, 0.91], mean=0.905, std=0.007, alpha=0.3)
    tie = LabelsOnly(**common, difference=0.004, standard_error=0.01, verdict=Verdict.WITHIN_NOISE, lower=-0.0156,
                     detectable=0.028)
    (said,) = twin_warning(tie)
    assert "does not beat its labels-only twin" in said and "+0.0040" in said and "0.0280" in said
    assert "added nothing measurable" in tie.text
    win = LabelsOnly(**common, difference=0.05, standard_error=0.01, verdict=Verdict.BEATS, lower=0.03)
    assert twin_warning(win) == [] and win.text.startswith("distillation beats its labels-only twin")
    same = LabelsOnly(**common, difference=0.0, standard_error=0.0, verdict=Verdict.SAME)
    assert "labels alone" in twin_warning(same)[0]
    unjudged = LabelsOnly(**common, difference=math.nan, standard_error=math.nan, verdict=Verdict.UNJUDGED)
    assert twin_warning(unjudged) == [] and twin_warning(None) == []
