-- PostgreSQL roles of a streamfleet deployment, least privilege. Run once per database, as a
-- superuser (or the database owner), before the first deployment, with psql variables for the
-- passwords:
--   psql -v owner_password=… -v persister_password=… -d streamfleet -f deploy/postgres/roles.sql
-- The persister's privileges on the tables come with the migrations
-- (schemas/migrations/*_persister_grants.sql), applied by the setup Job as the owner.
-- tests/tests/least_privilege.rs runs the persister under these roles.

-- The owner of the schema: the setup Job runs `fleetctl migrate` (and `fleetctl groups create`,
-- which reads checkpoints) as this role.
SELECT 'CREATE ROLE streamfleet_owner LOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'streamfleet_owner') \gexec
ALTER ROLE streamfleet_owner PASSWORD :'owner_password';
GRANT CREATE, USAGE ON SCHEMA public TO streamfleet_owner;

-- The persister: insert rows (and read their ids), upsert and read checkpoints; no UPDATE or DELETE
-- of events, no reading their data, no DDL.
SELECT 'CREATE ROLE streamfleet_persister LOGIN'
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'streamfleet_persister') \gexec
ALTER ROLE streamfleet_persister PASSWORD :'persister_password';
GRANT USAGE ON SCHEMA public TO streamfleet_persister;
