"""conftest.stop_process_group: SIGTERM to a process group, SIGKILL after the grace period, every wait bounded."""
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import group_members, stop_process_group, wait_until


def _group(script: str) -> subprocess.Popen:
    """`sh -c script` leading a process group of its own, once its child `sleep` has started."""
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)

    def sleeping() -> bool:
        # the child must have exec'd `sleep`: a shell's forked child that has not yet exec'd counts as a member too
        names = []
        for pid in group_members(proc.pid):
            try:
                names.append(Path(f"/proc/{pid}/comm").read_text().strip())
            except OSError:
                pass
        return sorted(names) == ["sh", "sleep"]

    wait_until(sleeping, 10, "the group's sleep to start")
    return proc


def test_a_group_that_exits_on_sigterm_gets_no_sigkill(recwarn):
    proc = _group("sleep 60 & wait")
    out = stop_process_group(proc.pid, "sleeper", grace_s=10, reap=proc)
    assert out["killed"] is False and not group_members(proc.pid)
    assert proc.returncode == -signal.SIGTERM
    assert not [w for w in recwarn if "sleeper" in str(w.message)]


def test_a_group_that_ignores_sigterm_is_killed_and_reported():
    proc = _group("trap '' TERM; sleep 60 & wait")    # the ignored SIGTERM is inherited by `sleep`
    with pytest.warns(UserWarning, match=r"stubborn: not gone 0.5s after SIGTERM .*SIGKILL to process group"):
        out = stop_process_group(proc.pid, "stubborn", grace_s=0.5, reap=proc)
    assert out["killed"] is True and not group_members(proc.pid)
    assert proc.returncode == -signal.SIGKILL
