-- Table grants of the runtime role. Idempotent; apply after every `induction-reconciler migrate`
-- (as the migrator or an administrator):  psql -d induction_reconciler -f deploy/postgres/grants.sql
--
-- The worker never deletes a row: state is replaced by upserts, and the inbox, outbox and
-- history only grow. Nothing here lets it alter the schema.

grant select, insert, update on registrations, induction_periods, teachers, inbox, outbox
    to induction_runtime;
grant select, insert on history, parked_log to induction_runtime;
-- `verify` records each run; every worker reads the last one for its metrics.
grant select, insert on audits to induction_runtime;
-- Identity columns draw from sequences.
grant usage on all sequences in schema public to induction_runtime;
-- `migrate` on start is off for this role; it may still read which migrations ran.
grant select on _sqlx_migrations to induction_runtime;
