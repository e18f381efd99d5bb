"""Run ``glmtune`` and SIGKILL it just before its N-th event: an optimizer step or a file rename.

``python tests/kill_at.py N train ...``. Renames (``os.replace``/``os.rename``) are where every save
commits, so killing before each one, and before each step, visits every state a kill -9 can leave
in order. ``N = 0`` kills nowhere and prints the number of events seen, for the test to iterate over.
"""

import atexit
import os
import signal
import sys

import torch

kill_at = int(sys.argv.pop(1))
events = 0


def counted(function):
    def wrapper(*args, **kwargs):
        global events
        events += 1
        if events == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)

    return wrapper


os.replace = counted(os.replace)
os.rename = counted(os.rename)
torch.optim.AdamW.step = counted(torch.optim.AdamW.step)
atexit.register(lambda: print(f"events={events}", file=sys.stderr))

from glmtune.cli import main_entry  # noqa: E402

sys.argv[0] = "glmtune"
main_entry()
