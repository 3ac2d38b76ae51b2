"""The tests' own start-up hook (quick_exit/sitecustomize.py): every Python process the tests start freezes its
objects at exit, and a sitecustomize the hook hides still runs."""

import os
import subprocess
import sys

PROBE = "import atexit, gc, sys; atexit._run_exitfuncs(); print(gc.get_freeze_count() > 0, 'hidden' in sys.modules)"


def test_a_child_process_freezes_at_exit_and_runs_the_sitecustomize_it_hides(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['hidden'] = sys\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.environ["PYTHONPATH"], str(tmp_path)]))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True"]
    env["PYTHONPATH"] = str(tmp_path)  # without the hook: nothing frozen
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
