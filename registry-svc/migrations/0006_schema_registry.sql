-- Tenants' payload schemas behind the Confluent Schema Registry API (docs/analytics.md).
--
-- A schema has one id however many subjects hold it, as in Confluent's registry: the id is
-- what the wire format's 4 bytes name. A subject is a tenant's telemetry or event topic plus
-- `-value` (TopicNameStrategy), so it belongs to that tenant and goes when the tenant goes.

CREATE TABLE payload_schemas (
    id          serial PRIMARY KEY,
    -- The schema as the registry serves it (apache-avro's JSON form of the parsed schema).
    schema      text NOT NULL,
    -- SHA-256 of `schema`: the same text gets the same id.
    fingerprint bytea NOT NULL UNIQUE
);

CREATE TABLE subject_versions (
    subject    text NOT NULL,
    version    integer NOT NULL,
    tenant_id  text NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    schema_id  integer NOT NULL REFERENCES payload_schemas (id),
    -- Soft-deleted versions keep their number and id, and leave the gateways' view.
    deleted    boolean NOT NULL DEFAULT false,
    created    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subject, version)
);
CREATE INDEX subject_versions_tenant_idx ON subject_versions (tenant_id);
CREATE INDEX subject_versions_schema_idx ON subject_versions (schema_id);

-- Compatibility levels: the subject '' (tenant NULL) holds the global level.
CREATE TABLE subject_config (
    subject       text PRIMARY KEY,
    tenant_id     text REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    compatibility text NOT NULL
);

-- Gateways cache a topic's schemas; a change drops the tenant's entries (and closes nothing).
CREATE FUNCTION ferrule_schema_notify() RETURNS trigger AS $$
DECLARE
    r record;
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    PERFORM pg_notify('ferrule_registry', json_build_object(
        'kind', 'schema', 'op', TG_OP, 'tenant', r.tenant_id)::text);
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER subject_versions_notify AFTER INSERT OR UPDATE OR DELETE ON subject_versions
    FOR EACH ROW EXECUTE FUNCTION ferrule_schema_notify();
