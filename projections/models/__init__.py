"""The read models, one module each: ``users``, ``rules``, ``jobs_log``, ``job_items_log``,
``billing_events``. Each holds its table definition beside its pure ``evolve``."""

from __future__ import annotations

from projections.models.base import ReadModel
from projections.models.billing_events import BILLING
from projections.models.job_items_log import JOB_ITEMS_LOG
from projections.models.jobs_log import JOBS_LOG
from projections.models.rules import RULES
from projections.models.users import USERS

READ_MODELS: dict[str, ReadModel] = {m.name: m for m in (USERS, RULES, JOBS_LOG, JOB_ITEMS_LOG, BILLING)}
