"""``python -m chunkcca``: the ``chunkcca`` command, run as ``python -m chunkcca.cli`` runs it (a process of
its own: its Ctrl-C is one line)."""

import runpy

if __name__ == "__main__":
    runpy.run_module("chunkcca.cli", run_name="__main__", alter_sys=True)
