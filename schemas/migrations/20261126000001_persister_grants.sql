-- What the persister's role may do (deploy/postgres/roles.sql creates it): insert rows (and read
-- their ids: ON CONFLICT (event_id) needs it), upsert and read checkpoints, nothing else. Granted
-- by the migrations so that a deployment that migrates as the schema's owner never grants by
-- hand; a database without that role is left as it is.
DO $$
BEGIN
  IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'streamfleet_persister') THEN
    GRANT USAGE ON SCHEMA public TO streamfleet_persister;
    GRANT INSERT, SELECT (event_id) ON events TO streamfleet_persister;
    GRANT SELECT, INSERT, UPDATE ON checkpoints TO streamfleet_persister;
  END IF;
END
$$;
