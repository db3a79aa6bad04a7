"""The background writer of batches: order, bound, errors handed back, interrupts, atomic pair directories."""

from __future__ import annotations

import csv
import json
import threading

from keyreg.cli import main
from keyreg.writer import BackgroundWriter
from test_cli_register import data  # noqa: F401  (fixture: two directories of oblique test images)


def test_jobs_run_in_order_and_errors_come_back_as_outcomes():
    ran: list[int] = []

    def job(i):
        def run():
            ran.append(i)
            if i == 1:
                raise ValueError("disk full")
            return i * 10
        return run

    w = BackgroundWriter(max_pending=2)
    for i in range(4):
        w.submit(i, job(i))
    outcomes = w.finished()
    outcomes += w.close()
    assert ran == [0, 1, 2, 3]
    assert [o.key for o in outcomes] == [0, 1, 2, 3]
    assert [o.value for o in outcomes] == [0, None, 20, 30]
    assert isinstance(outcomes[1].error, ValueError) and all(o.error is None for o in outcomes if o.key != 1)


def test_submit_blocks_while_max_pending_jobs_are_unfinished():
    release = threading.Event()
    w = BackgroundWriter(max_pending=1)
    w.submit("first", release.wait)
    second_queued = threading.Event()

    def submit_second():
        w.submit("second", lambda: None)
        second_queued.set()

    t = threading.Thread(target=submit_second)
    t.start()
    t.join(0.5)
    assert t.is_alive() and not second_queued.is_set()  # the first job holds the only slot
    release.set()
    t.join()
    assert [o.key for o in w.close()] == ["first", "second"]


def test_an_interrupt_in_a_job_drops_the_queued_jobs_and_close_cancel_never_starts_them():
    ran: list[str] = []
    gate = threading.Event()

    def interrupted():
        gate.wait()
        raise KeyboardInterrupt

    w = BackgroundWriter(max_pending=3)
    w.submit("a", interrupted)
    w.submit("b", lambda: ran.append("b"))
    gate.set()
    outcomes = w.close()
    assert ran == [] and [o.key for o in outcomes] == ["a"] and isinstance(outcomes[0].error, KeyboardInterrupt)

    gate.clear()
    started = threading.Event()

    def running_a():
        started.set()
        return gate.wait() and ran.append("a")

    w = BackgroundWriter(max_pending=3)
    w.submit("a", running_a)
    w.submit("b", lambda: ran.append("b"))
    assert started.wait(30)  # "a" is running before the cancel: it finishes, "b" never starts
    closer = threading.Thread(target=lambda: w.close(cancel=True))
    closer.start()
    while not w._cancel:  # the cancel request is in before the running job ends
        threading.Event().wait(0.01)
    gate.set()
    closer.join()
    assert ran == ["a"]


def test_a_batch_records_a_pair_whose_writing_failed_and_leaves_no_partial_directory(
        data, tiny_model_files, tmp_path, monkeypatch, capsys):  # noqa: F811
    import keyreg.export as export

    real = export.save_alignment
    writers: set[str] = set()

    def failing_save(res, directory, **kw):
        writers.add(threading.current_thread().name)
        files = real(res, directory, **kw)  # the files are written, then the disk "fills up"
        if directory.parent.name.startswith(".b_to_a."):
            raise OSError(28, "No space left on device")
        return files

    monkeypatch.setattr(export, "save_alignment", failing_save)
    out = tmp_path / "out"
    args = ["register", "--moving", str(data / "mov"), "--fixed", str(data / "fix"), "--all_pairs",
            "--load_path", str(tiny_model_files), "--list_of_aligns", "affine", "--save_dir", str(out),
            "--device", "cpu", "--save_eval_to_disk"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "FAILED b_to_a:" in err and "No space left on device" in err and "Traceback" not in err
    assert writers == {"keyreg-writer"}  # a batch writes on the background thread
    pairs = out / "pairs"
    assert sorted(p.name for p in pairs.iterdir()) == ["a", "a_to_b", "b"]  # no b_to_a, no temporaries
    with open(out / "metrics.csv", newline="") as f:
        assert [r["pair"] for r in csv.DictReader(f)] == ["a", "a_to_b", "b"]
    assert [f["pair"] for f in json.loads((out / "metrics.json").read_text())["failures"]] == ["b_to_a"]


def test_a_single_pairs_write_error_is_raised(data, tiny_model_files, tmp_path, monkeypatch,
                                               capsys):  # noqa: F811
    """A single pair is written on the background writer too (while its next align is computed); its
    write error still ends the command with one line and exit status 2, and leaves no pair directory."""
    import keyreg.export as export

    threads = []

    def failing_save(res, directory, **kw):
        threads.append(threading.current_thread())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_alignment", failing_save)
    out = tmp_path / "out"
    args = ["register", "--moving", str(next((data / "mov").iterdir())), "--fixed",
            str(next((data / "fix").iterdir())), "--load_path", str(tiny_model_files), "--list_of_aligns",
            "affine", "--save_dir", str(out), "--device", "cpu", "--save_eval_to_disk"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "No space left on device" in err and "Traceback" not in err
    assert not (out / "pairs").exists() or not any((out / "pairs").iterdir())
    assert threads and threads[0] is not threading.main_thread()
