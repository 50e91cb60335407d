-- The relay claims unpublished outcomes in id order. Without this index it walks every
-- published row from the start of the table on each round, which grows with the outbox.
create index outbox_pending_by_id on outbox (id) where published_at is null;
