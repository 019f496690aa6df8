"""The console progress line of long loops inside a job (stderr redirected to the log)."""

import contextlib
import io
import sys

from tdabench.progress import Progress


def test_console_line_only_when_stderr_is_redirected(monkeypatch):
    console, log = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", console)
    with contextlib.redirect_stderr(log):  # what a job does with its log file
        items = list(Progress(range(5), desc="gradients", unit="batches", every=0.0))
    assert items == list(range(5))
    lines = console.getvalue().splitlines()
    assert lines[0].startswith("[tdabench] gradients: 1/5 batches (") and "ETA" in lines[0]
    assert len(lines) == 4  # one per step but the last (the bar in the log shows completion)
    assert "gradients" in log.getvalue()  # the tqdm bar went to the log

    console.truncate(0)
    monkeypatch.setattr(sys, "stderr", console)  # not redirected: the bar is enough
    bar = Progress(total=3, desc="train", every=0.0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert "[tdabench]" not in console.getvalue()
