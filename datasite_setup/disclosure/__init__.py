"""Disclosure control: what of a site task's result may leave this site. The one place these rules live.

Site tasks compute; they do not decide what is safe to release. One small filter per rule, chosen
by the site's `[privacy] filters` and applied in a fixed order by `policy.Policy` in the site's
parent process, after the task ran in isolation: the min-count cleanser, differential-privacy
noise (with the per-data-scientist epsilon budget), the histogram-bins cleanser and the release
ledger. The first three look at one result; the ledger reasons over all the releases a data
scientist has had, using the cohorts the task reports privately (`cohorts.py`). Model updates
have their own filter, chosen by `[privacy.update_dp]` (`update_noise.py`): clipped and noised at
the site, their privacy loss composed per data scientist (`update_accountant.py`) and charged to
the same budget; `[privacy.sample_dp]` makes training itself DP-SGD (`sample_noise.py`), accounted
the same way. Evaluations have theirs, `[privacy.evaluation_dp]` (`evaluation_noise.py`): a model of
the data scientist's choosing is a query on the labels, so its error sums leave noised, accounted
the same way again.
"""

from datasite_setup.disclosure.budget import BudgetExhausted, PrivacyBudget
from datasite_setup.disclosure.evaluation_noise import NOISE_SCALAR, EvaluationNoise, evaluation_noise_problem
from datasite_setup.disclosure.cohorts import (
    CohortRecord, LedgerRefused, ReleaseRefused, TaskDeclined, read_task_release,
)
from datasite_setup.disclosure.ledger import ReleaseLedger
from datasite_setup.disclosure.noise import dp_epsilon, dp_problems
from datasite_setup.disclosure.policy import FILTERS, Policy, protect
from datasite_setup.disclosure.released import Released
from datasite_setup.disclosure.sample_noise import SampleNoise, SampleNoiseMismatch
from datasite_setup.disclosure.update_accountant import UpdateAccountant
from datasite_setup.disclosure.update_noise import DP_SCALARS, UpdateNoise, update_noise_problems

__all__ = [
    "DP_SCALARS", "FILTERS", "NOISE_SCALAR", "EvaluationNoise", "evaluation_noise_problem", "BudgetExhausted", "CohortRecord", "LedgerRefused", "Policy", "PrivacyBudget", "Released",
    "ReleaseLedger", "ReleaseRefused", "TaskDeclined", "dp_epsilon", "dp_problems", "protect", "read_task_release",
    "SampleNoise", "SampleNoiseMismatch", "UpdateAccountant", "UpdateNoise", "update_noise_problems",
]
