-- Who published each applied message (CONTRACT.md section 2, "Who may say what"): the RabbitMQ
-- user it was judged by, for the audit trail `explain` shows. Null for history written before
-- this column existed and for outcomes.
alter table history add column published_by text;
