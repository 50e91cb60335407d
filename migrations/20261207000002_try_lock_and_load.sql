-- A lane's batch takes its locks without waiting for another transaction's (issue 15, seventeenth
-- round; ARCHITECTURE decision 44).
--
-- `lock_and_load_v2` waits for every record and teacher lock it needs. Two lanes (or two
-- workers) whose batches touch one teacher then run one after the other: a registration that
-- moves between teachers locks both, and the teachers are spread over the lanes by TRN, so a
-- batch with a move often needs a teacher the other lane's batch holds, and waited for the whole
-- of that batch (sampled from `pg_stat_activity` during a drain: a quarter of a lane, on
-- average, waited on an advisory lock).
--
-- `try_lock_and_load` takes the same locks in the same order without waiting: a lock another
-- transaction holds is left, and so is everything that needs it. It returns what the teachers
-- whose locks it got hold (`held_by_v2`), and one row of kind `blocked` for each record, and
-- each teacher, that the caller must not write now:
-- - a record whose own lock it did not get, or that counts now for a teacher whose lock it did
--   not get (`registration_id` or `induction_period_id` set);
-- - a teacher whose lock it did not get (`trn` set).
-- The caller defers the messages that need one of them to a transaction that waits
-- (`lock_and_load_v2`), after this one commits. Never waiting, it cannot deadlock; locks it got
-- for what it defers are held until it ends, as any lock of a batch is.
--
-- A new function beside `lock_and_load_v2`, which stays for the deferred messages and for the
-- release before (a rolling update runs both).
create function try_lock_and_load(
    record_names text[],
    registration_ids text[],
    induction_period_ids text[],
    snapshot_trns int4[]
) returns setof held_row_v2
language plpgsql
as $$
declare
    missed_records int4[];
    owner_names text[];
    owner_trns int4[];
    locked text[];
    missed_teachers int4[];
begin
    -- The records' locks (class 1), tried; the keys another transaction holds.
    select coalesce(array_agg(k), '{}') into missed_records
    from (select distinct hashtext(n) as k from unnest(record_names) as n order by 1) as keys
    where not pg_try_advisory_xact_lock(1, k);
    -- The TRN each record whose lock it got counts for now, read in a new snapshot (a statement
    -- of its own in a volatile function), so that it sees every commit made before the locks.
    select coalesce(array_agg(o.name), '{}'), coalesce(array_agg(o.trn), '{}')
    into owner_names, owner_trns
    from (
        select 'registration:' || r.registration_id as name, r.trn::int4 as trn
        from registrations r where r.registration_id = any(registration_ids)
        union all
        select 'claim:' || p.induction_period_id, p.trn::int4
        from induction_periods p where p.induction_period_id = any(induction_period_ids)
    ) as o
    where hashtext(o.name) <> all(missed_records);
    -- The teachers' locks (class 2), tried in ascending order: every snapshot's TRN and every
    -- such record's; the TRNs of those it got, and those another transaction holds.
    select coalesce(array_agg(lpad(t::text, 7, '0')) filter (where got), '{}'),
           coalesce(array_agg(t) filter (where not got), '{}')
    into locked, missed_teachers
    from (
        select t, pg_try_advisory_xact_lock(2, t) as got
        from (select unnest(snapshot_trns) as t union select unnest(owner_trns)) as touched
        order by t
    ) as tried;

    return query select * from held_by_v2(locked);
    if cardinality(missed_records) = 0 and cardinality(missed_teachers) = 0 then
        return;
    end if;
    -- What must wait: records whose lock it did not get, records that count for a teacher whose
    -- lock it did not get, and those teachers.
    return query
    select 'blocked'::text,
           case when n like 'registration:%' then substr(n, 14) end,
           case when n like 'claim:%' then substr(n, 7) end,
           null::text, null::integer, null::date, null::date, null::text, null::text, null::text,
           null::smallint, null::text, null::boolean, null::timestamptz, null::smallint,
           null::uuid, null::text, null::bytea
    from (
        select n from unnest(record_names) as n where hashtext(n) = any(missed_records)
        union
        select n from unnest(owner_names, owner_trns) as o(n, t) where t = any(missed_teachers)
    ) as blocked;
    return query
    select 'blocked'::text, null::text, null::text, lpad(t::text, 7, '0'), null::integer,
           null::date, null::date, null::text, null::text, null::text, null::smallint,
           null::text, null::boolean, null::timestamptz, null::smallint, null::uuid, null::text,
           null::bytea
    from unnest(missed_teachers) as t;
end
$$;
