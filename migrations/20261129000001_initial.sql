-- The reconciler's state. Personal data kept: the TRN only (it is the key the outcomes carry).
-- Names, dates of birth and any other unknown input fields are never stored.

-- The latest snapshot of every school registration.
create table registrations (
    registration_id     text primary key check (registration_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    trn                 text not null check (trn ~ '^[0-9]{7}$'),
    school_urn          integer not null check (school_urn between 100000 and 999999),
    started_on          date not null check (started_on >= date '2021-09-01'),
    finished_on         date check (finished_on >= started_on),
    appropriate_body_id text not null check (appropriate_body_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    training_programme  text not null check (training_programme in ('provider_led', 'school_led')),
    lead_provider_id    text check (lead_provider_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    deleted             boolean not null,
    -- The snapshot's position: (occurred_at, occurred_at_ns, message_id). Postgres keeps
    -- microseconds; occurred_at_ns keeps the rest so that ordering is exact.
    occurred_at         timestamptz not null,
    occurred_at_ns      smallint not null check (occurred_at_ns between 0 and 999),
    message_id          uuid not null,
    check ((training_programme = 'provider_led') = (lead_provider_id is not null))
);
create index registrations_trn on registrations (trn);

-- The latest snapshot of every AB induction period.
create table induction_periods (
    induction_period_id text primary key check (induction_period_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    trn                 text not null check (trn ~ '^[0-9]{7}$'),
    appropriate_body_id text not null check (appropriate_body_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    started_on          date not null check (started_on >= date '1999-09-01'),
    finished_on         date check (finished_on >= started_on),
    training_programme  text check (training_programme in ('provider_led', 'school_led')),
    -- Tenths of a term, 0 to 160.
    number_of_terms_tenths smallint check (number_of_terms_tenths between 0 and 160),
    outcome             text check (outcome in ('pass', 'fail')),
    deleted             boolean not null,
    occurred_at         timestamptz not null,
    occurred_at_ns      smallint not null check (occurred_at_ns between 0 and 999),
    message_id          uuid not null,
    check ((finished_on is null) = (number_of_terms_tenths is null)),
    check (outcome is null or finished_on is not null)
);
create index induction_periods_trn on induction_periods (trn);

-- Per teacher: the last outcome emitted (as its wire JSON), its version and provisional spell.
create table teachers (
    trn               text primary key check (trn ~ '^[0-9]{7}$'),
    version           bigint not null check (version >= 1),
    status            text not null check (status in ('confirmed', 'provisional', 'conflict', 'closed')),
    provisional_since timestamptz,
    overdue           boolean not null,
    last_outcome      jsonb not null,
    updated_at        timestamptz not null,
    check ((status = 'provisional') = (provisional_since is not null)),
    check (not overdue or status = 'provisional')
);
-- The overdue sweep's query.
create index teachers_awaiting_sweep on teachers (provisional_since)
    where status = 'provisional' and not overdue;
create index teachers_open_conflicts on teachers (status) where status = 'conflict';

-- Every accepted message_id with a digest of its body: duplicates and message_id_reused.
create table inbox (
    message_id   uuid primary key,
    body_sha256  bytea not null check (length(body_sha256) = 32),
    message_type text not null check (message_type in ('school_registration', 'ab_claim')),
    admission    text not null check (admission in ('latest', 'stale', 'duplicate')),
    received_at  timestamptz not null
);

-- Outcomes waiting to be published, and those published (kept for `explain` and audits).
create table outbox (
    id           bigint generated always as identity primary key,
    outcome_id   uuid not null unique,
    trn          text not null check (trn ~ '^[0-9]{7}$'),
    version      bigint not null check (version >= 1),
    routing_key  text not null,
    body         bytea not null,
    traceparent  text,
    created_at   timestamptz not null,
    published_at timestamptz,
    unique (trn, version)
);
create index outbox_pending on outbox (trn, version) where published_at is null;

-- What was applied and emitted per teacher, for `explain`. No personal data beyond the TRN.
create table history (
    id          bigint generated always as identity primary key,
    trn         text not null check (trn ~ '^[0-9]{7}$'),
    at          timestamptz not null,
    event       text not null check (event in ('applied', 'stale', 'moved_away', 'emitted', 'swept')),
    message_id  uuid,
    message_type text,
    record_kind text check (record_kind in ('registration', 'claim')),
    record_id   text,
    outcome_id  uuid,
    version     bigint,
    status      text
);
create index history_trn on history (trn, id);
