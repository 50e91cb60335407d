-- A teacher's last outcome is read from the outbox, not kept twice (issue 15; ARCHITECTURE
-- decision 33).
--
-- Every version of a teacher's outcome is an outbox row, written by the same statement as the
-- teacher's row and kept (the worker deletes none, and the triggers below refuse to delete the
-- current one), and its body is the exact JSON that was published. The
-- teacher's `last_outcome` held the same JSON again, as `jsonb`: every outcome parsed about a
-- kilobyte into `jsonb`, wrote it into a row that then could rarely be updated in place, and
-- logged it to the WAL, and every batch printed it back out as text for the worker to parse.
-- From this release the worker leaves `last_outcome` null and reads the body of the outbox row
-- (trn, version) through `outbox_trn_version_key`. A teacher written before keeps its
-- `last_outcome`; it is read only if its outbox row were missing (a database restored without
-- it), as `resync` already did.
--
-- The column and `held_by` stay for the release before, which runs beside this one during a
-- rolling update (deploy/kubernetes: migrations first, then one pod at a time): `held_by` now
-- gives it the outbox's body where `last_outcome` is null, so its batches read what this
-- release wrote. A later release can drop the column, `held_by`, `lock_and_load` and `held_row`.

alter table teachers alter column last_outcome drop not null;

-- `held_row` with the last outcome as the bytes that were published.
create type held_row_v2 as (
    kind text,
    registration_id text,
    induction_period_id text,
    trn text,
    school_urn integer,
    started_on date,
    finished_on date,
    appropriate_body_id text,
    training_programme text,
    lead_provider_id text,
    number_of_terms_tenths smallint,
    outcome text,
    deleted boolean,
    occurred_at timestamptz,
    occurred_at_ns smallint,
    message_id uuid,
    origin text,
    last_outcome bytea
);

-- What the teachers hold (as `held_by`), each teacher's last outcome read from the outbox row of
-- its version.
create function held_by_v2(trns text[]) returns setof held_row_v2
language sql
stable
as $$
    select 'registration'::text, r.registration_id, null::text, r.trn, r.school_urn, r.started_on,
           r.finished_on, r.appropriate_body_id, r.training_programme, r.lead_provider_id,
           null::smallint, null::text, r.deleted, r.occurred_at, r.occurred_at_ns, r.message_id,
           r.origin, null::bytea
    from registrations r where r.trn = any(trns)
    union all
    select 'claim'::text, null::text, p.induction_period_id, p.trn, null::integer, p.started_on,
           p.finished_on, p.appropriate_body_id, p.training_programme, null::text,
           p.number_of_terms_tenths, p.outcome, p.deleted, p.occurred_at, p.occurred_at_ns,
           p.message_id, p.origin, null::bytea
    from induction_periods p where p.trn = any(trns)
    union all
    select 'teacher'::text, null::text, null::text, t.trn, null::integer, null::date, null::date,
           null::text, null::text, null::text, null::smallint, null::text, null::boolean,
           null::timestamptz, null::smallint, null::uuid, null::text,
           coalesce(o.body, convert_to(t.last_outcome::text, 'UTF8'))
    from teachers t left join outbox o on o.trn = t.trn and o.version = t.version
    where t.trn = any(trns)
$$;

-- `held_by` for the release before: the same rows, each teacher's last outcome parsed back into
-- `jsonb` (once per teacher and batch, and only while that release runs).
create or replace function held_by(trns text[]) returns setof held_row
language sql
stable
as $$
    select kind, registration_id, induction_period_id, trn, school_urn, started_on, finished_on,
           appropriate_body_id, training_programme, lead_provider_id, number_of_terms_tenths,
           outcome, deleted, occurred_at, occurred_at_ns, message_id, origin,
           convert_from(last_outcome, 'UTF8')::jsonb
    from held_by_v2(trns)
$$;

-- `lock_and_load` returning `held_row_v2`.
create function lock_and_load_v2(
    record_names text[],
    registration_ids text[],
    induction_period_ids text[],
    snapshot_trns int4[]
) returns setof held_row_v2
language plpgsql
as $$
declare
    locked text[];
begin
    select coalesce(array_agg(lpad(t::text, 7, '0')), '{}') into locked
    from unnest(lock_batch(record_names, registration_ids, induction_period_ids, snapshot_trns)) as t;
    return query select * from held_by_v2(locked);
end
$$;

-- The outbox row of a teacher's version is now the only copy of the teacher's last outcome:
-- deleting it (a retention job, a hand-made clean-up) would leave the teacher unreadable and park
-- every later message about it. Refuse that with an error that says why and names the row's id,
-- never the teacher's TRN (personal data stays out of error messages and logs). Other rows, and
-- rows of teachers an earlier release stored with their `last_outcome`, may go.
create function outbox_keeps_last_outcomes() returns trigger
language plpgsql
as $$
begin
    if tg_op = 'TRUNCATE' then
        if exists (select 1 from teachers where last_outcome is null) then
            raise exception 'the outbox holds the teachers'' last outcomes and cannot be truncated'
                using errcode = 'restrict_violation',
                      hint = 'delete published rows that are not a teacher''s current version instead';
        end if;
        return null;
    end if;
    if exists (select 1 from teachers t
               where t.trn = old.trn and t.version = old.version and t.last_outcome is null) then
        raise exception 'outbox row % is a teacher''s last outcome and cannot be deleted', old.id
            using errcode = 'restrict_violation',
                  hint = 'keep the row of each teacher''s current version (teachers.version)';
    end if;
    return old;
end
$$;

create trigger outbox_keeps_last_outcomes before delete on outbox
    for each row execute function outbox_keeps_last_outcomes();
create trigger outbox_keeps_last_outcomes_on_truncate before truncate on outbox
    for each statement execute function outbox_keeps_last_outcomes();
