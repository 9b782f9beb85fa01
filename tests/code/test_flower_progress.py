"""The Flower runtime's progress file, read by the stage while the run goes."""

from __future__ import annotations


def test_progress_tail_hands_each_finished_line_over_once(tmp_path):
    """The stage reads the ServerApp's progress file while the run goes: every complete
    line once, a half-written last line only when it is complete."""
    import json

    from pipelines.federated.flower_deploy import ProgressTail

    seen = []
    tail = ProgressTail(tmp_path / "progress.jsonl", seen.append)
    tail.poll()  # no file yet
    path = tmp_path / "progress.jsonl"
    path.write_text(json.dumps({"round": 1}) + "\n" + '{"round": ')
    tail.poll()
    assert seen == [{"round": 1}]
    path.write_text(json.dumps({"round": 1}) + "\n" + json.dumps({"round": 2}) + "\n")
    tail.poll()
    tail.poll()
    assert seen == [{"round": 1}, {"round": 2}] and tail.seen == 2
