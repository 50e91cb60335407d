-- Bodies the worker has parked. A delivery the broker redelivers after a crash between the
-- parking confirm and the acknowledgement is recognised here and not parked twice. (A message
-- published again, which the broker does not flag as redelivered, is parked again, so parked
-- messages can still be replayed.) No personal data: a digest and a reason code.
create table parked_log (
    body_sha256 bytea not null check (length(body_sha256) = 32),
    reason      text not null,
    parked_at   timestamptz not null
);
create index parked_log_digest on parked_log (body_sha256);
