-- Least privilege for induction-reconciler. Run once per database, as an administrator, before
-- the first migration:  psql -d induction_reconciler -f deploy/postgres/roles.sql
-- Then set passwords out of band:  ALTER ROLE induction_runtime PASSWORD '...';
--
-- induction_migrator owns the schema objects and runs `induction-reconciler migrate`.
-- induction_runtime is what `induction-reconciler run --no-migrate` connects as; its table
-- grants are in grants.sql, applied after every migration.

do $$
begin
    if not exists (select from pg_roles where rolname = 'induction_migrator') then
        create role induction_migrator login;
    end if;
    if not exists (select from pg_roles where rolname = 'induction_runtime') then
        create role induction_runtime login;
    end if;
    execute format('grant connect on database %I to induction_migrator, induction_runtime', current_database());
end
$$;

-- PostgreSQL 15 no longer lets every role create objects in public.
grant usage, create on schema public to induction_migrator;
grant usage on schema public to induction_runtime;
