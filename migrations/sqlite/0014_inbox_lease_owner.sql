-- Which process holds a delivery's lease (`<pid>:<boot id>:<start time>`):
-- a daemon started after another was killed sees that the holder is gone
-- and takes its deliveries up at once, rather than when their leases run
-- out. NULL on rows leased before this column: those wait out their lease.
ALTER TABLE inbox ADD COLUMN lease_owner TEXT;
