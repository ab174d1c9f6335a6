"""Ray's errors during a search go whole to ray-errors.log; the console gets one line (search.cluster.ray_errors_to)."""
import logging

from ray._private import worker

from search.cluster import ray_errors_to


def test_a_ray_logger_traceback_goes_to_the_log_and_the_console_gets_one_line(tmp_path, capsys):
    # what Tune's experiment state logs when a sync to shared storage races a file being renamed (CI saw it)
    ray_logger = logging.getLogger("ray")
    before = ray_logger.handlers[:]
    lines: list[str] = []
    with ray_errors_to(tmp_path / "ray-errors.log", lines.append):
        try:
            raise FileNotFoundError("Failed to open local file '/tmp/x/.tmp-searcher-state.pkl'")
        except FileNotFoundError:
            logging.getLogger("ray.tune.execution.experiment_state").error(
                "Saving experiment state to storage at '/shared/ray' failed with exception: ", exc_info=True)
        worker.print_to_stdstream({"lines": ["The node 192.0.2.2 has been marked dead. More text."], "pid": "gcs"})
    assert ray_logger.handlers == before  # Ray's own handlers are back after the block
    log = (tmp_path / "ray-errors.log").read_text()
    assert "Traceback" in log and "Failed to open local file" in log and "marked dead" in log
    assert lines == ["Ray: Saving experiment state to storage at '/shared/ray' failed with exception: "
                     "FileNotFoundError. (Ray's message in " + str(tmp_path / "ray-errors.log") + ")",
                     "Ray: The node 192.0.2.2 has been marked dead. More text. (Ray's message in "
                     + str(tmp_path / "ray-errors.log") + ")"]
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
