"""The joblib launcher of ``launcher=joblib``, made to survive a job whose process is killed.

Hydra loads launchers only from the ``hydra_plugins`` package, hence this
module; the work is in :func:`pipeline.runs.sweep.relaunch_unfinished`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures.process import BrokenProcessPool

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_joblib_launcher.joblib_launcher import JoblibLauncher

from pipeline.runs import sweep


class SurvivingJoblibLauncher(JoblibLauncher):
    """Hydra's ``JoblibLauncher`` (same options) that outlives a killed job process.

    When a job's process dies (SIGKILL, the out-of-memory killer), loky breaks
    the pool and joblib raises ``TerminatedWorkerError``, a ``BrokenProcessPool``;
    the jobs it left unfinished then run again one at a time, and one killed
    again is recorded as failed (``failed.json``) with the worst objective.
    """

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        try:
            return super().launch(job_overrides, initial_job_idx)
        except BrokenProcessPool as err:
            return sweep.relaunch_unfinished(self, job_overrides, initial_job_idx, err)
