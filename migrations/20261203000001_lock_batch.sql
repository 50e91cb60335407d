-- A batch's locks in one round trip (issue 15), in the order ARCHITECTURE.md ("Concurrency")
-- requires: the advisory locks of every record the batch carries a snapshot of (class 1, keyed
-- by a hash of kind and id) in ascending key order; then, read under those locks, the TRNs the
-- records count for now; then the advisory locks of every teacher touched (class 2, the TRN as
-- its key) in ascending order. Each statement of a volatile PL/pgSQL function takes a new
-- snapshot, so the read sees every commit made before the record locks were granted, as the
-- three statements the worker sent before did. Returns the teachers locked, in order.
create function lock_batch(
    record_names text[],
    registration_ids text[],
    induction_period_ids text[],
    snapshot_trns int4[]
) returns int4[]
language plpgsql
as $$
declare
    lock_key int4;
    teachers int4[];
begin
    for lock_key in select distinct hashtext(record_name) from unnest(record_names) as record_name order by 1 loop
        perform pg_advisory_xact_lock(1, lock_key);
    end loop;
    select coalesce(array_agg(distinct trn order by trn), '{}') into teachers from (
        select unnest(snapshot_trns) as trn
        union all
        select r.trn::int4 from registrations r where r.registration_id = any(registration_ids)
        union all
        select p.trn::int4 from induction_periods p where p.induction_period_id = any(induction_period_ids)
    ) as touched;
    foreach lock_key in array teachers loop
        perform pg_advisory_xact_lock(2, lock_key);
    end loop;
    return teachers;
end
$$;
