"""Metric records: a resumed run keeps one record per step, in metrics.jsonl and TensorBoard.

Progress bars: written to a log, they update every half minute, not ten times a second.
"""

import json
import struct
import subprocess
import sys
import time

from tensorboardX.proto import event_pb2

from mmrec_jax import reporting


def _events(folder):
    """Every Event of the TFRecord event files in `folder` (length, crc, data, crc)."""
    events = []
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            record = data[offset + 12 : offset + 12 + length]
            events.append(event_pb2.Event.FromString(record))
            offset += 12 + length + 4
    return events


def test_a_resumed_run_drops_the_records_of_the_steps_it_trains_again(tmp_path):
    writer = reporting.MetricsWriter(tmp_path)
    for step in range(1, 6):
        writer.write(step, {"train/loss": 1.0 / step})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as file:
        file.write('{"step": 6, "train/lo')  # cut off by a killed process
    # Resumed from the checkpoint of step 3: steps 4 and 5 are trained (and logged) again.
    writer = reporting.MetricsWriter(tmp_path, resume_step=3)
    for step in (4, 5):
        writer.write(step, {"train/loss": 2.0 / step})
    writer.close()
    records = reporting.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["train/loss"] for r in records[3:]] == [0.5, 0.4]
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 5
    # TensorBoard is told to drop the first run's events from step 4 on (tensorboardX's
    # purge_step: a SessionLog START at that step).
    starts = [
        e.step for e in _events(tmp_path / "tensorboard")
        if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START
    ]  # fmt: skip
    assert starts == [4]


# In a fresh process: writes TensorBoard scalars, and says which modules it imported.
_WRITE_IN_A_FRESH_PROCESS = """
import sys
from mmrec_jax import reporting
writer = reporting.MetricsWriter(sys.argv[1])
writer.write(1, {"train/loss": 0.5})
writer.close()
print("torch" in sys.modules)
import torch  # still importable afterwards
print(torch.ones(2).sum().item())
"""


def test_tensorboard_events_are_written_without_importing_pytorch(tmp_path):
    # tensorboardX imports PyTorch, when installed (as in the test extras), only to accept
    # its tensors: 2 s and ~200 MB of every training process.
    out = subprocess.run(
        [sys.executable, "-c", _WRITE_IN_A_FRESH_PROCESS, str(tmp_path)],
        capture_output=True, text=True, check=True, timeout=300,
    ).stdout.split()  # fmt: skip
    assert out == ["False", "2.0"]
    values = [
        (e.step, v.tag, v.simple_value)
        for e in _events(tmp_path / "tensorboard") if e.HasField("summary")
        for v in e.summary.value
    ]  # fmt: skip
    assert values == [(1, "train/loss", 0.5)]


def test_a_resume_keeps_a_copy_of_a_damaged_metrics_file(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    damaged = b'{"step": 1, "train/loss": 0.9}\n{"st\xff\x00p": 2, "tr\n{"step": 3, "x": 1.0}\n'
    path.write_bytes(damaged)
    reporting.MetricsWriter(tmp_path, resume_step=3).close()
    assert reporting.read_metrics(tmp_path) == [
        {"step": 1, "train/loss": 0.9},
        {"step": 3, "x": 1.0},
    ]
    assert (tmp_path / "metrics_damaged.jsonl").read_bytes() == damaged
    out = capsys.readouterr().out
    assert "metrics.jsonl: line 2 is not a metrics record (damaged)" in out
    assert f"as it was in {tmp_path / 'metrics_damaged.jsonl'}" in out
    # A second resume keeps the earlier copy; a clean file makes no copy.
    path.write_bytes(damaged)
    reporting.MetricsWriter(tmp_path, resume_step=3).close()
    assert (tmp_path / "metrics_damaged_1.jsonl").read_bytes() == damaged
    reporting.MetricsWriter(tmp_path, resume_step=3).close()
    assert not (tmp_path / "metrics_damaged_2.jsonl").exists()


def test_a_fresh_start_drops_an_earlier_attempts_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 0.9}\n{"note": "by hand"}\n{"step": 2, "train/l')
    writer = reporting.MetricsWriter(tmp_path, resume_step=0)  # nothing was saved before
    writer.write(1, {"train/loss": 0.7})
    writer.close()
    assert reporting.read_metrics(tmp_path) == [{"step": 1, "train/loss": 0.7}]


def test_a_progress_bar_into_a_log_updates_rarely_in_lines_of_their_own(capsys):
    # pytest's captured stderr is no terminal, as a log file or a pipe is not.
    with reporting.progress_bar("work", 40, "item") as bar:
        # Nor does tqdm's monitor thread redraw it between the log's updates.
        assert bar.mininterval == bar.maxinterval == reporting.LOG_UPDATE_INTERVAL_S
        for done in range(1, 41):  # 0.6 s: six updates at a terminal's interval
            time.sleep(0.015)
            bar.update(1)
            if done == 20:
                bar.write("halfway: a message")
    captured = capsys.readouterr()
    assert "\r" not in captured.err and captured.out == "halfway: a message\n"
    lines = captured.err.splitlines()
    assert len(lines) == 2, lines  # the start and the end, no redraw around the message
    assert lines[0].startswith("work:   0%|") and lines[1].startswith("work: 100%|")
    assert lines[1].rstrip() == lines[1]
    with reporting.progress_bar("work", 40, "item", enabled=False) as bar:
        bar.update(40)
    assert capsys.readouterr().err == ""


def test_a_progress_bar_into_a_log_writes_each_count_once(capsys, monkeypatch):
    monkeypatch.setattr(reporting, "LOG_UPDATE_INTERVAL_S", 0.0)
    with reporting.progress_bar("work", 5, "item") as bar:
        for _ in range(5):
            bar.update(1)
            bar.refresh()  # a redraw at the same count adds no line
    lines = capsys.readouterr().err.splitlines()
    counts = [line.split("|")[-1].split("[")[0].strip() for line in lines]
    assert counts == ["0/5", "1/5", "2/5", "3/5", "4/5", "5/5"], lines  # closing adds none


def test_summary_table_explains_an_undefined_gauc():
    summary = {
        "train": {"model": {"auc": 0.8, "gauc": 0.75}, "oracle": None},
        "test": {"model": {"auc": 0.7, "gauc": None}, "oracle": {"auc": 0.9}},
        "test_cold": {"model": {"auc": None, "gauc": None}, "oracle": None},  # one class
    }
    lines = reporting.summary_table(summary).splitlines()
    assert lines[0].split() == ["split", "auc", "gauc", "oracle", "auc"]
    assert lines[3].split() == ["test", "0.7000", "-", "0.9000"]
    assert lines[-1] == (
        "gauc -: no user of test has both a positive and a negative row (as when each user "
        "has one held-out row)."
    )


def test_summary_table_says_where_gauc_averages_few_users():
    few = reporting.FEW_GAUC_USERS - 1
    summary = {
        "test": {"model": {"auc": 0.7, "gauc": 0.6}, "oracle": None, "gauc_users": few},
        "test_cold": {"model": {"auc": 0.7, "gauc": 0.5}, "oracle": None, "gauc_users": 2},
        "validation": {"model": {"auc": 0.7, "gauc": 0.6}, "gauc_users": few + 1},
        "train": {"model": {"auc": 0.7, "gauc": None}, "gauc_users": 0},  # undefined: said so
    }
    lines = reporting.summary_table(summary).splitlines()
    assert lines[-1] == (
        f"gauc averages few users (with both a positive and a negative row): test {few}, "
        "test_cold 2; read it as noise."
    )
    assert lines[-2].startswith("gauc -: no user of train")
    del summary["test"], summary["test_cold"]
    assert "few users" not in reporting.summary_table(summary)
