-- Outcomes published by the lane that committed them (issue 15). A lane that will publish its
-- batch's outcomes itself right after the commit writes them with a lease: until `lease_until`
-- the relay leaves them alone (they are still unpublished, so no later version of the same
-- teacher goes before them). The lane marks them published once the broker confirmed them, or
-- clears the lease when it could not publish them; a lease that runs out (the worker died)
-- hands the rows to any relay. Rows written without a lease are the relay's from the start.
alter table outbox add column lease_until timestamptz;
