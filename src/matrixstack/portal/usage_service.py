"""Usage: one record per request through the portal, written in batches, summed per key, and reported.

A record's `entry` is a catalog entry's name or the gateway's one unknown bucket, never a client's text, so the
groups of a report are bounded by the catalog, the tenants and the keys, not by what clients send. Reports are
summed in SQL (GROUP BY) and come a page at a time (`limit`, at most `MAX_PAGE` groups, and `offset`), so their
size does not grow with the history.

The functions take the caller's session and never commit (`matrix.database`); the usage writer writes a whole
batch in one unit of work.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import case, func, insert, select
from sqlalchemy.orm import Session

from matrixstack.errors import UserError
from matrixstack.matrix.store import TenantRow, utcnow
from matrixstack.portal.store import ApiKeyRow, UsageRow

GROUPINGS = ("tenant", "key", "entry")
MAX_PAGE = 1000  # groups in one page of a usage report


@dataclass
class UsageRecord:
    """One request's usage, as the portal writes it (created_at in UTC)."""

    tenant_id: int | None
    key_id: int | None
    entry: str
    prompt_tokens: int
    completion_tokens: int
    status_code: int
    latency_ms: float
    ttft_ms: float | None = None
    created_at: datetime = field(default_factory=utcnow)


def record_usage(session: Session, records: Iterable[UsageRecord]) -> None:
    """Write a batch of usage records."""
    # vars(), not asdict(): asdict copies each field recursively, which cost most of the write (~50 -> ~17 us a row)
    rows = [{**vars(r), "created_at": _utc(r.created_at)} for r in records]
    if rows:
        session.execute(insert(UsageRow), rows)


def tokens_used(session: Session, key_id: int) -> int:
    """Return the tokens (prompt + completion) a key has used over its life."""
    total = func.coalesce(func.sum(UsageRow.prompt_tokens + UsageRow.completion_tokens), 0)
    return int(session.scalar(select(total).where(UsageRow.key_id == key_id)))


def usage_report(
    session: Session,
    group_by: Iterable[str] = ("tenant",),
    since: datetime | None = None,
    limit: int = MAX_PAGE,
    offset: int = 0,
) -> list[dict[str, Any]]:
    """Return one page of usage rows grouped by any of tenant, key (its prefix), entry, with requests,
    prompt_tokens, completion_tokens, total_tokens and errors (status >= 400), since `since` (naive = UTC) when
    given: the `limit` groups after the first `offset`, in the order of the groups' values.

    No grouping gives one row of totals. Raises UserError for an unknown grouping or a page outside
    1 <= limit <= MAX_PAGE, offset >= 0.
    """
    groups = list(dict.fromkeys(group_by))
    unknown = [g for g in groups if g not in GROUPINGS]
    if unknown:
        raise UserError(f"group by {', '.join(unknown)}: unknown; group by any of {', '.join(GROUPINGS)}")
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        raise UserError(f"limit={limit}, offset={offset}: give 1 <= limit <= {MAX_PAGE} and offset >= 0")
    columns = {"tenant": TenantRow.name, "key": ApiKeyRow.prefix, "entry": UsageRow.entry}
    keys = [columns[g].label(g) for g in groups]
    prompt = func.coalesce(func.sum(UsageRow.prompt_tokens), 0)
    completion = func.coalesce(func.sum(UsageRow.completion_tokens), 0)
    errors = func.coalesce(func.sum(case((UsageRow.status_code >= 400, 1), else_=0)), 0)
    query = (
        select(*keys, func.count(UsageRow.id), prompt, completion, errors)
        .select_from(UsageRow)
        .outerjoin(TenantRow, TenantRow.id == UsageRow.tenant_id)
        .outerjoin(ApiKeyRow, ApiKeyRow.id == UsageRow.key_id)
    )
    if since is not None:
        query = query.where(UsageRow.created_at >= _utc(since))
    if keys:
        query = query.group_by(*(columns[g] for g in groups)).order_by(*(columns[g] for g in groups))
        query = query.limit(limit).offset(offset)
    out = []
    for row in session.execute(query):
        values = dict(zip(groups, row[: len(groups)], strict=True))
        n, p, c, e = (int(v) for v in row[len(groups) :])
        out.append(values | {"requests": n, "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                             "errors": e})  # fmt: skip
    return out


def busiest_entries(session: Session, start: datetime, end: datetime, top: int) -> dict[str, Any]:
    """Return the usage of [start, end) (naive = UTC): requests, prompt_tokens, completion_tokens and the number of
    `entries` used, over every record, and `by_entry`: the `top` entries with the most tokens (then requests, then
    name), each {"entry", "requests", "total_tokens"}."""
    window = (UsageRow.created_at >= _utc(start), UsageRow.created_at < _utc(end))
    prompt = func.coalesce(func.sum(UsageRow.prompt_tokens), 0)
    completion = func.coalesce(func.sum(UsageRow.completion_tokens), 0)
    totals = select(func.count(UsageRow.id), prompt, completion, func.count(func.distinct(UsageRow.entry)))
    requests, prompt_tokens, completion_tokens, entries = (int(v) for v in session.execute(totals.where(*window)).one())
    tokens = func.coalesce(func.sum(UsageRow.prompt_tokens + UsageRow.completion_tokens), 0).label("tokens")
    requests_of = func.count(UsageRow.id).label("requests")
    busiest = (
        select(UsageRow.entry, requests_of, tokens)
        .where(*window)
        .group_by(UsageRow.entry)
        .order_by(tokens.desc(), requests_of.desc(), UsageRow.entry)
        .limit(top)
    )
    by_entry = [{"entry": e, "requests": int(n), "total_tokens": int(t)} for e, n, t in session.execute(busiest)]
    return {"requests": requests, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "entries": entries, "by_entry": by_entry}  # fmt: skip


def _utc(moment: datetime) -> datetime:
    """Return a datetime in UTC (a naive one is taken as UTC already)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
