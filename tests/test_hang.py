"""A hung or vanished peer ends the job with a retryable exit (docs/architecture.md), not a stuck one."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from support import finish, read_until, run_cli, start_run
from trainer.controller.local import free_port, operator_env
from trainer.errors import EXIT_HANG
from trainer.worker.watchdog import HangWatchdog


def test_watchdog_stays_quiet_while_beaten_and_fires_after_the_timeout(monkeypatch):
    # The watchdog's clock is the test's: real time (a loaded machine's stalls) does not count.
    now = [1000.0]
    monkeypatch.setattr("trainer.worker.watchdog.time.monotonic", lambda: now[0])
    fired = threading.Event()
    watchdog = HangWatchdog(0.5, on_hang=fired.set).start()  # it looks every 0.05 s (real time)
    for _ in range(20):  # 9 s of beaten progress, each beat 0.45 s after the last
        now[0] += 0.45
        watchdog.beat("step")
        time.sleep(0.1)  # the watch thread looks meanwhile: however late, the clock stands still
    assert not fired.wait(0.2)
    now[0] += 0.6  # then no progress for longer than the timeout
    assert fired.wait(60), "no progress for longer than the timeout must fire"
    watchdog.stop()


def test_a_frozen_peer_makes_the_others_exit_142(tmp_path):
    proc = start_run(tmp_path, "--set",
                      "job.restartPolicy=Never,training.distributed.hangTimeoutSeconds=5")
    m, lines = read_until(proc, r"^\[master-0\] 1 +0 +1 +worker-1 +\S+ +(\d+)")
    _, more = read_until(proc, r"step \d+/")
    os.kill(int(m.group(1)), signal.SIGSTOP)  # the worker freezes (as on a wedged GPU or NFS)
    result = finish(proc, lines + more)
    assert result.returncode == EXIT_HANG, result.stdout[-2000:]
    assert "hang detected: no progress for" in result.stdout
    assert result.summary["failed_replica"] == "master-0"


def test_a_vanished_peer_is_a_retryable_exit_without_the_runner(tmp_path):
    # Two trainer processes as the operator starts them (no local runner to stop the survivor).
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"experiment": "vanish", "metrics": {"enabled": False},
                                  "training": {"epochs": 200, "data": {"trainSamples": 2048, "evalSamples": 64},
                                               "batchSize": 32, "logEverySteps": 5}}))
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "trainer", "--config", str(config)], cwd=tmp_path,
                              env={**os.environ, **operator_env(i, 2, 1, port), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        for line in procs[0].stdout:
            if re.search(r"step \d+/", line):
                break
        procs[1].kill()
        out, _ = procs[0].communicate(timeout=120)
        assert procs[0].returncode == EXIT_HANG, out[-2000:]
        assert "retryable: a collective failed" in out and "Traceback" not in out
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


SLOW_EVAL = """
import dataclasses, time
from trainer.tasks import get_task


class SlowItems:
    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        time.sleep(0.05)
        return self.inner[index]


def build(cfg):
    spec = get_task("cifar10-convnet")(cfg)
    return dataclasses.replace(spec, eval_dataset=SlowItems(spec.eval_dataset))
"""


def test_a_long_evaluation_is_progress_not_a_hang(tmp_path):
    # 96 eval items of at least 50 ms each: an evaluation of 4.8 s or more (a sleep only runs long), longer
    # than the 3 s hang timeout however fast the machine; each batch of 2 (100 ms) feeds the watchdog,
    # so the run finishes instead of exiting 142.
    (tmp_path / "slow_eval.py").write_text(SLOW_EVAL)
    result = run_cli("run", "longeval", "--workdir", str(tmp_path), "--set",
                     "job.nodes=1,training.maxSteps=2,training.data.trainSamples=64,training.batchSize=2",
                     "--set", "training.data.evalSamples=96,training.distributed.hangTimeoutSeconds=3",
                     "--set", "training.task=custom,training.entrypoint=slow_eval:build",
                     "--set-json", f"training.pythonPath={json.dumps([str(tmp_path)])}",
                     env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-2000:]
    assert "hang detected" not in result.stdout
    assert result.summary["eval_accuracy"] is not None
