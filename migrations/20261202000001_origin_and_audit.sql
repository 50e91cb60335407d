-- CONTRACT.md revision of 2026-12-01: every snapshot keeps its origin (`live`, or `migration` for
-- history loaded from the ECF1 service or the AB portal), so that outcomes can carry it.
-- Snapshots stored before this migration were all live.
alter table registrations add column origin text not null default 'live'
    check (origin in ('live', 'migration'));
alter table induction_periods add column origin text not null default 'live'
    check (origin in ('live', 'migration'));

-- `verify --emit` writes the outcome of a teacher re-reconciled after a rule change as
-- history event `reconciled`.
alter table history drop constraint history_event_check;
alter table history add constraint history_event_check
    check (event in ('applied', 'stale', 'moved_away', 'emitted', 'swept', 'reconciled'));

-- One row per `verify` run, so that the worker can export the last audit's result as metrics
-- (induction_reconciler_audit_differing_teachers and _audit_last_run_timestamp_seconds).
create table audits (
    id           bigint generated always as identity primary key,
    started_at   timestamptz not null,
    finished_at  timestamptz not null,
    checked      bigint not null check (checked >= 0),
    differing    bigint not null check (differing >= 0),
    emitted      bigint not null check (emitted >= 0)
);
