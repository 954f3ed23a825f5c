"""Run `skillhub ARGS...` and SIGKILL the process at the N-th call of a named function.

    python tests/crash_add.py FUNCTION N skillhub-args...

Test scaffolding only: skillhub itself has no crash hooks. The profile hook is installed
after the heavy imports, so it only watches the command itself.
"""

import os
import signal
import sys

import skillhub.cli
import skillhub.registry.front  # noqa: F401 - imported before the hook, so only the command is profiled

target, wanted = sys.argv[1], int(sys.argv[2])
calls = 0


def hook(frame, event, arg):
    global calls
    name = getattr(arg, "__name__", None) if event == "c_call" else frame.f_code.co_name if event == "call" else None
    if name == target:
        calls += 1
        if calls == wanted:
            os.kill(os.getpid(), signal.SIGKILL)


sys.argv = ["skillhub", *sys.argv[3:]]
sys.setprofile(hook)
skillhub.cli.main()
