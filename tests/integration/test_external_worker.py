"""The worker with an admin's external wrapper: what the backend says ends up in events."""

from __future__ import annotations

import stat
import threading
from collections.abc import Callable
from pathlib import Path

from integration_support import events_of, register_tool, step_of, wait_for

from jobcell.service import Cell
from jobcell.worker import Worker


def script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_status_command_printing_nonsense_is_an_event_not_a_failure(
        make_cell: Callable[..., Cell], tools: Path, tmp_path: Path) -> None:
    submit = script(tmp_path / "submit.sh",
                    '#!/bin/sh\nsetsid "$JOBCELL_LOCAL_STEP_SCRIPT" >/dev/null 2>&1 '
                    '</dev/null &\necho "ext-$JOBCELL_STEP_ID"\n')
    status = script(tmp_path / "status.sh", "#!/bin/sh\necho 'the queue is on fire'\n")
    cell = make_cell(executor_backend="external", external_submit_cmd=[submit],
                     external_status_cmd=[status], backend_poll_interval_s=0.1,
                     backend_poll_max_interval_s=0.2)
    gate = tmp_path / "gate"
    register_tool(cell, tools, "held", ["gate-write", str(gate), "{output_dir}"])
    job_id = cell.submit({"label": "ext", "steps": [{"id": "h", "runner": "held"}]}).job_id
    worker = Worker(cell.home, cell.settings, cell.store)
    thread = threading.Thread(target=worker.run, kwargs={"until_idle": True}, daemon=True)
    thread.start()
    try:
        [error] = wait_for(lambda: events_of(cell, job_id, "backend_error"), 30,
                           "the backend_error event")
        assert "the queue is on fire" in error["message"]
        assert step_of(cell.status(job_id), "h")["state"] == "running"
        gate.touch()   # the exit_code file, not the status command, decides
        wait_for(lambda: cell.status(job_id)["state"] == "succeeded", 30, "the job to end")
    finally:
        worker.request_stop()
        thread.join(timeout=30)
    step = step_of(cell.status(job_id), "h")
    assert (step["backend"], step["backend_id"]) == ("external", "ext-h")
    assert len(events_of(cell, job_id, "backend_error")) == 1   # noted once, not per round
