"""How busy the trial slots were, read per attempt from the trials' reports (search.run.slot_use)."""
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
