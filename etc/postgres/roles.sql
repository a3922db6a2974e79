-- Least privilege for user-rpc. Run once, as a superuser, connected to the service's database
-- (docker-compose.yml mounts it into /docker-entrypoint-initdb.d):
--   psql -v ON_ERROR_STOP=1 -d user_rpc -f etc/postgres/roles.sql
--
-- user_rpc_owner  owns the schema: `user-rpc migrate` and `user-rpc seed` run as it.
-- user_rpc_app    is what `user-rpc serve --skip-migrations` connects as: it may connect and
--                 read `users`, nothing else (no INSERT/UPDATE/DELETE, no DDL, no other table).
--                 Cancelling its own abandoned queries (pg_cancel_backend) needs no grant.
--
-- The passwords are for local development only: in production set your own, e.g.
--   ALTER ROLE user_rpc_app PASSWORD '...';
CREATE ROLE user_rpc_owner LOGIN PASSWORD 'owner-dev-password';
CREATE ROLE user_rpc_app LOGIN PASSWORD 'app-dev-password' CONNECTION LIMIT 100;

-- Only these roles (and superusers) may connect to this database.
DO $$
BEGIN
    EXECUTE format('REVOKE ALL ON DATABASE %I FROM PUBLIC', current_database());
    EXECUTE format('GRANT CONNECT ON DATABASE %I TO user_rpc_owner, user_rpc_app',
                   current_database());
END
$$;

REVOKE ALL ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO user_rpc_owner;
GRANT USAGE ON SCHEMA public TO user_rpc_app;

-- Tables the owner creates from now on (the migrations) are readable by the service.
ALTER DEFAULT PRIVILEGES FOR ROLE user_rpc_owner IN SCHEMA public
    GRANT SELECT ON TABLES TO user_rpc_app;
