"""`torchrun ... tests/rank_hooks.py TRAIN_ARGS`: train.py as a script (`python train.py`, the path torchrun takes)
with test hooks, for tests/test_multiproc.py. Not a test module.

Environment:
  HOOKS_DIR   this rank writes there: out_<rank>.log (its stdout and stderr), pid_<rank> (its process id),
              done_<rank>_<iteration> after each iteration, eval_<rank> when an evaluation starts,
              evalimg_<rank> (a line per image it reads),
              preflight_<rank> (the time its preflight returned), saved_<rank> (after it wrote last.pt),
              stopped_<rank> (when a stop reached it, after the barrier)
  HOOKS_SLOW  seconds to sleep after each iteration and before each evaluation image (so a signal lands there)
  HOOKS_DELAY_RANK1_PREFLIGHT  seconds rank 1's preflight waits before it checks (the preflight race)
  HOOKS_RANK1_PROBLEM  rank 1's preflight (only) finds this problem; locked_<rank> marks a rank that took --out's lock
  HOOKS_SLOW_SAVE  seconds every save of last.pt takes longer
"""
import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
rank = int(os.environ.get("RANK", "0"))
hooks = Path(os.environ["HOOKS_DIR"])
log = os.open(hooks / f"out_{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
os.dup2(log, 1)
os.dup2(log, 2)
(hooks / f"pid_{rank}").write_text(str(os.getpid()))
slow = float(os.environ.get("HOOKS_SLOW", "0"))

import evaluate  # noqa: E402
from runtools import preflight  # noqa: E402
from runtools import runs  # noqa: E402

after_iteration, evaluate_model, check = runs.after_iteration, evaluate.evaluate_model, preflight.preflight
save_state = runs.save_state


def after(state, env, inputs, log, say, stop, done, *args, **kwargs):
    try:
        result = after_iteration(state, env, inputs, log, say, stop, done, *args, **kwargs)
    except runs.Interrupted:
        (hooks / f"stopped_{rank}").write_text(repr(time.time()))
        raise
    (hooks / f"done_{rank}_{done}").touch()
    time.sleep(slow)
    return result


def slow_save(path, state, iteration):
    time.sleep(float(os.environ.get("HOOKS_SLOW_SAVE", "0")))
    save_state(path, state, iteration)
    (hooks / f"saved_{rank}").write_text(repr(time.time()))


def slow_evaluation(model, dataset, *args, loader=None, **kwargs):
    (hooks / f"eval_{rank}").touch()

    def images(samples):
        for sample in samples:
            time.sleep(slow)
            with open(hooks / f"evalimg_{rank}", "a") as f:  # one line per image handed to the evaluation
                f.write(f"{sample['name']}\n")
            yield sample
    return evaluate_model(model, dataset, *args, loader=images(loader) if loader is not None else None, **kwargs)


def delayed_preflight(cfg, env, *args, **kwargs):
    if env.rank == 1:
        time.sleep(float(os.environ.get("HOOKS_DELAY_RANK1_PREFLIGHT", "0")))
    try:
        if env.rank == 1 and os.environ.get("HOOKS_RANK1_PROBLEM"):
            raise runs.Problems([os.environ["HOOKS_RANK1_PROBLEM"]])
        return check(cfg, env, *args, **kwargs)
    finally:
        (hooks / f"preflight_{rank}").write_text(repr(time.time()))


def marked_acquire(lock, *args, **kwargs):
    (hooks / f"locked_{rank}").write_text(repr(time.time()))
    return acquire(lock, *args, **kwargs)


acquire = runs.OutLock.acquire
runs.after_iteration, evaluate.evaluate_model, preflight.preflight = after, slow_evaluation, delayed_preflight
runs.OutLock.acquire = marked_acquire
runs.save_state = slow_save
sys.argv = [str(ROOT / "train.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
