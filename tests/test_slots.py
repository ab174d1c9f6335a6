"""How busy the trial slots were, read per attempt from the trials' reports (search.run.slot_use), and how the
teachers share a CPU node."""
import itertools

import pytest

from search.run import slot_use


def report(node, pid, started, at):
    return {"node": node, "pid": pid, "attempt_started": started, "reported_at": at}


def test_a_trial_retried_on_another_node_counts_each_attempt_in_its_own_process():
    # trial a ran on node 1 until the node was lost at 10 s, then again in process 2 of node 2 from 12 s to 20 s;
    # process 2 ran trial b before (0-11 s) and trial c after (21-30 s)
    histories = {
        "a": [report("n1", 1, 0.0, 5.0), report("n1", 1, 0.0, 10.0), report("n2", 2, 12.0, 20.0)],
        "b": [report("n2", 2, 0.0, 11.0)],
        "c": [report("n2", 2, 21.0, 25.0), report("n2", 2, 21.0, 30.0)],
    }
    use = slot_use(histories, slots=2)
    assert use is not None
    assert use.busy == pytest.approx((10 + 11 + 8 + 9) / (2 * 30))
    assert sorted(use.idle) == pytest.approx([1.0, 1.0])  # a's first attempt, on a lost node, is no wait of node 2
    assert use.median_idle == pytest.approx(1.0)


def test_trials_of_an_earlier_version_without_placements_have_no_slot_figures():
    assert slot_use({"a": [{"epoch": 1}]}, slots=2) is None
    assert slot_use({"a": [report("n1", 1, 0.0, 4.0)]}, slots=None).busy is None


@pytest.mark.slow
def test_on_a_cpu_node_the_refits_teacher_waits_for_the_fold_teachers_and_the_trials(shared_search):
    """The fold teachers take the whole CPU node, one at a time; the refit's teacher, on one trial's CPU, starts only
    when the search's finalize asks (beside the re-ranking): submitted with the fold teachers, Ray started it in the
    gap one left and the next, which the trials wait for, waited for it; started beside the trials, it took a slot
    Ray Tune did not fill again when it came free. Read from the test run's shared search, whose teachers were
    fine-tuned in its own cache."""
    from search.records import BestRecord, TeacherRecord
    from tests.helpers import read_table
    _cfg, run_dir, _ = shared_search
    teachers = TeacherRecord.read(run_dir)
    assert teachers is not None and not teachers.info.cached
    members = sorted((p.started, p.ended) for p in teachers.placement)
    assert len(members) == 2 and all(end <= start for (_, end), (start, _) in itertools.pairwise(members))
    best = BestRecord.read(run_dir)
    assert best is not None and best.teacher is not None and not best.teacher.cached  # fine-tuned once asked
    trials = read_table(run_dir / "trials.csv")
    assert best.teacher.started >= trials["ended"].max() >= trials["started"].min() >= members[-1][1]
