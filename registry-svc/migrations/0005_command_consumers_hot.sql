-- Long-polling devices (HTTP and CoAP `hono-ttd`) register and release a command consumer
-- on every poll. A release used to delete the row and the next poll inserted it again, which
-- left a dead row version and a new index entry per poll: until autovacuum came by (once a
-- minute at most), every route look-up walked the device's dead versions, and PostgreSQL spent
-- as much CPU as the gateways. A release now marks the row (`expires = '-infinity'`) and the
-- next registration updates it in place. Neither touches an indexed column unless the device
-- moves to another instance, so PostgreSQL can keep the versions on the same page (a HOT
-- update) and prune them there; the free space per page below is what makes that possible.
ALTER TABLE command_consumers SET (fillfactor = 50);
COMMENT ON COLUMN command_consumers.expires IS
    'NULL: until unregistered; -infinity: released (kept for a while, then purged)';
COMMENT ON COLUMN command_consumers.registered IS 'when the row last changed';
