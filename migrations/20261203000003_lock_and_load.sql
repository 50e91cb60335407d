-- A batch's locks and what its teachers hold, in one round trip (issue 15).
--
-- `held_by` (rows of type `held_row`): the held snapshots of every record that counts for one of the teachers, and each
-- one's last outcome, as rows of one shape told apart by `kind` (read back by
-- `store::records::held_from_rows`). `verify` reads it on its own; `lock_and_load` after the
-- locks.
create type held_row as (
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
    last_outcome jsonb
);

create function held_by(trns text[]) returns setof held_row
language sql
stable
as $$
    select 'registration'::text, r.registration_id, null::text, r.trn, r.school_urn, r.started_on,
           r.finished_on, r.appropriate_body_id, r.training_programme, r.lead_provider_id,
           null::smallint, null::text, r.deleted, r.occurred_at, r.occurred_at_ns, r.message_id,
           r.origin, null::jsonb
    from registrations r where r.trn = any(trns)
    union all
    select 'claim'::text, null::text, p.induction_period_id, p.trn, null::integer, p.started_on,
           p.finished_on, p.appropriate_body_id, p.training_programme, null::text,
           p.number_of_terms_tenths, p.outcome, p.deleted, p.occurred_at, p.occurred_at_ns,
           p.message_id, p.origin, null::jsonb
    from induction_periods p where p.trn = any(trns)
    union all
    select 'teacher'::text, null::text, null::text, t.trn, null::integer, null::date, null::date,
           null::text, null::text, null::text, null::smallint, null::text, null::boolean,
           null::timestamptz, null::smallint, null::uuid, null::text, t.last_outcome
    from teachers t where t.trn = any(trns)
$$;

-- `lock_batch`, then `held_by` of the teachers it locked, in a statement of its own: a volatile
-- PL/pgSQL function takes a new snapshot for each statement, so the read sees every commit made
-- before the teacher locks were granted.
create function lock_and_load(
    record_names text[],
    registration_ids text[],
    induction_period_ids text[],
    snapshot_trns int4[]
) returns setof held_row
language plpgsql
as $$
declare
    locked text[];
begin
    select coalesce(array_agg(lpad(t::text, 7, '0')), '{}') into locked
    from unnest(lock_batch(record_names, registration_ids, induction_period_ids, snapshot_trns)) as t;
    return query select * from held_by(locked);
end
$$;
