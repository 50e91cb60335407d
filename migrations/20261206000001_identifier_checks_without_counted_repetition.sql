-- The identifier checks, the same rule without a counted repetition (issue 15).
--
-- PostgreSQL's regular expression engine copies the atom of a counted repetition such as
-- `{1,64}`; matching '^[A-Za-z0-9._:-]{1,64}$' took 3.3 microseconds for a short identifier and 9.7 for a
-- 36-character one, and every write of a registration or a claim checks two or three identifiers
-- (twice when the insert becomes an update). '+' with a length check is the same rule (every
-- character it admits is one byte, so length counts them) at a sixth to a third of the cost
-- (ARCHITECTURE decision 32). NULL stays allowed where it was (`lead_provider_id`): NULL and NULL
-- is NULL, which a check passes. The constraints keep their names; adding each checks the rows
-- already there.

alter table registrations
    drop constraint registrations_registration_id_check,
    add constraint registrations_registration_id_check
        check (registration_id ~ '^[A-Za-z0-9._:-]+$' and length(registration_id) <= 64),
    drop constraint registrations_appropriate_body_id_check,
    add constraint registrations_appropriate_body_id_check
        check (appropriate_body_id ~ '^[A-Za-z0-9._:-]+$' and length(appropriate_body_id) <= 64),
    drop constraint registrations_lead_provider_id_check,
    add constraint registrations_lead_provider_id_check
        check (lead_provider_id ~ '^[A-Za-z0-9._:-]+$' and length(lead_provider_id) <= 64);

alter table induction_periods
    drop constraint induction_periods_induction_period_id_check,
    add constraint induction_periods_induction_period_id_check
        check (induction_period_id ~ '^[A-Za-z0-9._:-]+$' and length(induction_period_id) <= 64),
    drop constraint induction_periods_appropriate_body_id_check,
    add constraint induction_periods_appropriate_body_id_check
        check (appropriate_body_id ~ '^[A-Za-z0-9._:-]+$' and length(appropriate_body_id) <= 64);
